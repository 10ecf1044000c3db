# cmake -DEXE=text_lora -DOUT=dir -P resume_check.cmake
#
# text_lora --quick --pretrain-steps 30 --steps 12 run to the end in OUT/ref, and again in
# OUT/run stopped twice (--max-steps 20: inside pre-training; then 50: inside the second method)
# and resumed to the end: the same results.csv but for its timing and memory columns, the same
# samples, and the same trained weights, byte for byte.
include(${CMAKE_CURRENT_LIST_DIR}/../common/demo_checks.cmake)
require(EXE OUT)
file(REMOVE_RECURSE ${OUT})
set(REF ${OUT}/ref)
set(settings "--quick|--pretrain-steps|30|--steps|12")
set(OUT ${OUT}/run)
run_in_order(text_lora "${EXE}|${settings}|--out|${REF}" "${EXE}|${settings}|--out|${OUT}|--max-steps|20|--checkpoint-every|8"
             "${EXE}|--resume|${OUT}|--max-steps|50" "${EXE}|--resume|${OUT}")
# results.csv: method,step,heldout_bits_per_byte,trainable_parameters,english_bits_per_byte, then the
# timing and memory columns (tokens_per_s, heap_mib, latency_ms, latency_vs_base, unmerged_latency_ms)
set(timing "^([^,]*,[^,]*,[^,]*,[^,]*,[^,]*),.*$")  # without them
csv_lines(${OUT}/results.csv "${timing}" "\\1" got)
csv_lines(${REF}/results.csv "${timing}" "\\1" want)
if(NOT got STREQUAL want)
  message(FATAL_ERROR "results.csv differs from the uninterrupted run's:\n${got}\n---\n${want}")
endif()
foreach(f samples.txt pretrained/model.safetensors head_only/model.safetensors adapter_lora_qv/adapter_model.safetensors
          adapter_lora_all/adapter_model.safetensors full/model.safetensors adapter_tuning/methods.safetensors
          prefix_tuning/methods.safetensors ladder/methods.safetensors)
  execute_process(COMMAND ${CMAKE_COMMAND} -E compare_files ${OUT}/${f} ${REF}/${f} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${f} differs from the uninterrupted run's")
  endif()
endforeach()
message("text_lora resume: ok (stopped twice, resumed: the same results, samples and weights)")

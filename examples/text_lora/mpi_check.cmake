# cmake -DEXE=text_lora -DMPIRUN=mpiexec|-n|2 -DMPIRUN1=mpiexec|-n|1 -DOUT=dir -P mpi_check.cmake
#
# text_lora --quick --threads 1 as one process (OUT/one), as 2 ranks under mpirun (OUT/two), as 2
# ranks stopped inside the second method (--max-steps 75) then resumed by one process
# (OUT/moved), and as 2 ranks of which one is killed (SIGKILL) before its 50th all-reduce, in
# pre-training: the job must end (not hang) with an error, and one process resumes from the last
# checkpoint (OUT/killed). Every held-out bits per byte in results.csv within 2e-4 of the one
# process's (the ranks sum the gradients in another order, so floats differ in their last bits).
include(${CMAKE_CURRENT_LIST_DIR}/../common/demo_checks.cmake)
require(EXE MPIRUN MPIRUN1 OUT)
file(REMOVE_RECURSE ${OUT})
set(settings "--quick|--threads|1")
run_in_order(text_lora "${EXE}|${settings}|--out|${OUT}/one" "${MPIRUN}|${EXE}|${settings}|--out|${OUT}/two"
             "${MPIRUN}|${EXE}|${settings}|--out|${OUT}/moved|--max-steps|75" "${EXE}|--resume|${OUT}/moved")

# rank 0 alone and rank 1 with the fault point, as one job (mpirun's "A : B")
string(REPLACE "|" ";" first "${MPIRUN1}|${EXE}|${settings}|--out|${OUT}/killed|--checkpoint-every|20")
string(REPLACE "|" ";" second "${MPIRUN1}")
list(POP_FRONT second)  # the second app context: mpirun's options for it, without mpirun
execute_process(COMMAND ${first} : ${second} env LORA_FAULT_POINT=all_reduce_gradients@50 ${EXE} --quick --threads 1
                        --out ${OUT}/killed --checkpoint-every 20
                TIMEOUT 300 RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(rc EQUAL 0 OR NOT rc MATCHES "^[0-9]+$")
  message(FATAL_ERROR "2 ranks, rank 1 killed: the job should have ended with an error, got \"${rc}\":\n${out}\n${err}")
endif()
message("2 ranks, rank 1 killed before its 50th all-reduce: the job ended (exit ${rc})")
run_in_order(text_lora "${EXE}|--resume|${OUT}/killed")

# results.csv: method,step,heldout_bits_per_byte,... -> "method,step" and the bits per byte in
# millionths (an integer: CMake's arithmetic has no floats)
function(held_out dir keys values)
  file(STRINGS ${dir}/results.csv lines)
  list(POP_FRONT lines)
  set(k)
  set(v)
  foreach(line IN LISTS lines)
    if(NOT line MATCHES "^([^,]*,[^,]*),([0-9]+)\\.?([0-9]*),")
      message(FATAL_ERROR "${dir}/results.csv: cannot read \"${line}\"")
    endif()
    list(APPEND k "${CMAKE_MATCH_1}")
    set(whole ${CMAKE_MATCH_2})
    string(SUBSTRING "${CMAKE_MATCH_3}000000" 0 6 frac)
    string(REGEX REPLACE "^0+([0-9])" "\\1" frac "${frac}")
    math(EXPR micro "${whole} * 1000000 + ${frac}")
    list(APPEND v ${micro})
  endforeach()
  set(${keys} "${k}" PARENT_SCOPE)
  set(${values} "${v}" PARENT_SCOPE)
endfunction()
held_out(${OUT}/one want_keys want)
foreach(name two moved killed)
  held_out(${OUT}/${name} keys got)
  if(NOT keys STREQUAL want_keys)
    message(FATAL_ERROR "${name}/results.csv has other rows than one/results.csv:\n${keys}\n---\n${want_keys}")
  endif()
  set(worst 0)
  foreach(a b IN ZIP_LISTS got want)
    math(EXPR d "${a} - ${b}")
    if(d LESS 0)
      math(EXPR d "-${d}")
    endif()
    if(d GREATER worst)
      set(worst ${d})
    endif()
  endforeach()
  if(worst GREATER 200)
    message(FATAL_ERROR "${name}: a held-out bits per byte differs from one process's by ${worst}e-6")
  endif()
  message("${name}: held-out bits per byte within ${worst}e-6 of one process's")
endforeach()
message("text_lora mpi: ok")

# cmake -DEXE=fashion_mnist -DOUT=dir [-DMPIRUN=mpiexec|-n|2] -P resume_check.cmake
#
# fashion_mnist --quick --threads 1 run to the end in OUT/ref, and again in OUT/run stopped three
# times (--max-steps 20: inside pre-training; 70: inside the head-only method; 130: inside LoRA
# on every linear) and resumed to the end: the same results.csv but for its seconds column.
# With MPIRUN: the same run as 2 ranks (OUT/two), and 2 ranks stopped at step 70 then resumed by
# one process (OUT/moved), each with the same results.csv as the one process (the ranks sum the
# gradients in another order: the file's 6 digits have agreed; a difference there fails).
include(${CMAKE_CURRENT_LIST_DIR}/../common/demo_checks.cmake)
require(EXE OUT)
file(REMOVE_RECURSE ${OUT})
set(settings "--quick|--threads|1")
set(runs "${EXE}|${settings}|--out|${OUT}/ref" "${EXE}|${settings}|--out|${OUT}/run|--max-steps|20|--checkpoint-every|7"
         "${EXE}|--resume|${OUT}/run|--max-steps|70" "${EXE}|--resume|${OUT}/run|--max-steps|130" "${EXE}|--resume|${OUT}/run")
if(DEFINED MPIRUN)
  list(APPEND runs "${MPIRUN}|${EXE}|${settings}|--out|${OUT}/two"
                   "${MPIRUN}|${EXE}|${settings}|--out|${OUT}/moved|--max-steps|70" "${EXE}|--resume|${OUT}/moved")
endif()
run_in_order(fashion_mnist ${runs})

# results.csv: method,epoch,train_loss,test_accuracy,seconds,trainable_params without the seconds
set(seconds ",[^,]*,([^,]*)$")
csv_lines(${OUT}/ref/results.csv "${seconds}" ",\\1" want)
set(compared run)
if(DEFINED MPIRUN)
  list(APPEND compared two moved)
endif()
foreach(name IN LISTS compared)
  csv_lines(${OUT}/${name}/results.csv "${seconds}" ",\\1" got)
  if(NOT got STREQUAL want)
    message(FATAL_ERROR "${name}/results.csv differs from the uninterrupted one-process run's:\n${got}\n---\n${want}")
  endif()
  message("${name}: the same results.csv as one process without a stop")
endforeach()
message("fashion_mnist resume: ok")

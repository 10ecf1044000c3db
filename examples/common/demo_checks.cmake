# For the demos' ctest scripts (cmake -P).
#
# require(NAME...): each was given (-DNAME=...).
macro(require)
  foreach(v ${ARGN})
    if(NOT DEFINED ${v})
      message(FATAL_ERROR "${CMAKE_SCRIPT_MODE_FILE}: -D${v}=... is required")
    endif()
  endforeach()
endmacro()

# csv_lines(FILE REGEX REPLACE VAR): FILE's lines with REGEX replaced by REPLACE in each (to drop
# the columns that differ from run to run: seconds, tokens/s, memory).
function(csv_lines file regex replace var)
  file(STRINGS ${file} lines)
  set(kept)
  foreach(line IN LISTS lines)
    string(REGEX REPLACE "${regex}" "${replace}" line "${line}")
    list(APPEND kept "${line}")
  endforeach()
  set(${var} "${kept}" PARENT_SCOPE)
endfunction()

# run_in_order(PROGRAM run...)
#
# Each run is one list item, "command|argument|..." ('|' stands for ';' inside the item). The runs
# go in order; any that exits non-zero fails the script, as does a last run that does not end
# with "PROGRAM: ok". A run that starts with MPIRUN (the caller's mpirun command, '|' between its
# words, when set) must say that it trained "on each of 2 ranks", so that two lone processes
# cannot pass for two ranks.
function(run_in_order program)
  foreach(run IN LISTS ARGN)
    set(ranks OFF)
    if(DEFINED MPIRUN)
      string(FIND "${run}" "${MPIRUN}|" at)
      if(at EQUAL 0)
        set(ranks ON)
      endif()
    endif()
    string(REPLACE "|" ";" run "${run}")
    execute_process(COMMAND ${run} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
    string(REGEX MATCH "${program}: (stopped|ok|FAILED)[^\n]*" last "${out}")
    message("${run}: ${last}")
    if(NOT rc EQUAL 0)
      message(FATAL_ERROR "${run} failed (${rc}):\n${out}\n${err}")
    endif()
    if(ranks AND NOT out MATCHES "on each of 2 ranks")
      message(FATAL_ERROR "${run} did not train on 2 ranks:\n${out}")
    endif()
  endforeach()
  if(NOT out MATCHES "${program}: ok")
    message(FATAL_ERROR "the last run did not finish:\n${out}")
  endif()
endfunction()

# Sourced by gpu_quality.sh and cpu_quality.sh: the variant names of docs/results.md's quantizer table
# (also gpu_e2e.sh's checkpoint names) and what they mean to `sqllm-onnx quantize`. quantize_args NAME
# prints the arguments; quantize_extra NAME FISHER prints what a run of the table adds: the shared
# Fisher for the SqueezeLLM and lnq rows, and the unquantized perplexity once (with sq3s45).
quantize_args() {
  case $1 in
    sq3s0) echo --bits 3 --sparsity 0 ;;  sq3s5) echo --bits 3 --sparsity 0.05 ;;  sq3s45) echo --bits 3 --sparsity 0.45 ;;
    sq4s0) echo --bits 4 --sparsity 0 ;;  sq4s5) echo --bits 4 --sparsity 0.05 ;;  sq4s45) echo --bits 4 --sparsity 0.45 ;;
    rtn3) echo --bits 3 --method rtn ;;   rtn4) echo --bits 4 --method rtn ;;
    km3) echo --bits 3 --method kmeans ;; km4) echo --bits 4 --method kmeans ;;
    lnq3s0) echo --bits 3 --sparsity 0 --method lnq ;;  lnq3s45) echo --bits 3 --sparsity 0.45 --method lnq ;;
    lnq4s0) echo --bits 4 --sparsity 0 --method lnq ;;  lnq4s45) echo --bits 4 --sparsity 0.45 --method lnq ;;
    *) echo "unknown variant $1" >&2; return 1 ;;
  esac
}
quantize_extra() {
  [[ $1 == sq* || $1 == lnq* ]] && echo --fisher-cache "$2"
  [ "$1" = sq3s45 ] && echo --eval-baseline
  return 0
}

# Bash kernel driver: user code runs in this very shell so `cd`, `export`, variables and
# functions persist. Same protocol as the other drivers (protocol.ts): a `BASE64(code)` line then a
# `NONCE` line on fd 8, the nonce read only after the code ran; JSON reports on fd 3; a nonce
# sentinel on fds 1 and 2 after each execution. User code runs with fds 3 and 8 closed, so the
# programs it starts have neither; stdin is /dev/null, so `read` or `cat` cannot hang.

__oi_interrupted=0
# Cells are sourced rather than eval'ed: `return` from the trap then abandons the whole cell,
# loops included, while a plain trap would only kill the foreground child and carry on.
trap '__oi_interrupted=1; return 130 2>/dev/null' INT

builtin printf '{"type":"ready","version":"%s","pid":%d}\n' "${BASH_VERSION%%(*}" "$$" >&3

# `builtin` and `command` below: user code may define functions named like the tools used here.
while :; do
  IFS= builtin read -r -u 8 __oi_payload
  __oi_status=$?
  # An interrupt that lands while waiting for the next command only cuts the read short.
  ((__oi_status > 128)) && continue
  ((__oi_status == 0)) || exit 0

  __oi_interrupted=0
  if __oi_code=$(command base64 -d <<<"$__oi_payload"); then
    { builtin . /dev/fd/7 7<<<"$__oi_code"; } 3>&- 8<&-
    __oi_status=$?
  else
    __oi_status=2
  fi

  until IFS= builtin read -r -u 8 __oi_nonce; do
    (($? > 128)) || exit 0
  done
  if ((__oi_interrupted)); then
    __oi_status=130
    builtin printf '{"type":"error","name":"KeyboardInterrupt","value":"Interrupted","traceback":""}\n' >&3
  fi
  builtin printf '\002oi-end:%s\003' "$__oi_nonce"
  builtin printf '\002oi-end:%s\003' "$__oi_nonce" >&2
  builtin printf '{"type":"done","nonce":"%s","exit_code":%d}\n' "$__oi_nonce" "$__oi_status" >&3
done

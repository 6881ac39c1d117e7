# Bash kernel driver: user code runs in this very shell so `cd`, `export`, variables and
# functions persist. Same protocol as the other drivers (protocol.ts): a `BASE64(code)` line then a
# `NONCE` line on fd 8, the nonce read only after the code ran; JSON reports on fd 3; a nonce
# sentinel after each execution on the descriptors fds 1 and 2 had when the driver started (user
# code may redirect or close its own 1 and 2: `exec > f` must neither hang the execution nor get
# the sentinel). User code runs with fds 3, 8 and those saved copies closed, so the programs it
# starts have none of them; stdin is /dev/null, so `read` or `cat` cannot hang. The exception is
# an execution that asks for active lines (`BASE64(code) active_lines`): its DEBUG trap needs a
# copy of fd 3 while the cell runs (bash cannot keep a descriptor from the programs it starts),
# so those programs could write reports too; the server validates every report as it would
# forged ones from any kernel.

exec {__oi_out}>&1 {__oi_err}>&2
# An interrupt sets the flag until the execution it belongs to has ended (`done` is written), so
# one that lands before the cell starts still stops it. Inside a cell, `return` from the trap
# abandons the whole cell, loops included, while a plain trap would only kill the foreground
# child and carry on.
__oi_interrupted=0
__oi_in_cell=0
# (No arithmetic in the trap: bash can run it in the middle of parsing the cell, and `((` there
# confuses its parser.)
trap '__oi_interrupted=1; [ "$__oi_in_cell" = 1 ] && return 130' INT

# The way back is a descriptor: the workspace's parent may be closed to the kernel's user.
exec {__oi_cwd}<.
builtin cd -- "${0%/*}" && PATH= builtin . bash && builtin cd -P "/proc/self/fd/$__oi_cwd" || exit 126
exec {__oi_cwd}<&-
unset OLDPWD __oi_cwd
BASH_ARGV0=bash

builtin printf '{"type":"ready","version":"%s","pid":%d}\n' "${BASH_VERSION%%(*}" "$$" >&3

# `builtin` and `command` below: user code may define functions named like the tools used here.
while :; do
  IFS=' ' builtin read -r -u 8 __oi_payload __oi_flags
  __oi_status=$?
  # An interrupt that lands while waiting for the next command only cuts the read short.
  ((__oi_status > 128)) && continue
  ((__oi_status == 0)) || exit 0

  # Decoded through a process substitution, not `$(...)`: bash drops a SIGINT that lands while
  # it waits for a command substitution whose process did not die of it, and a read is cut
  # short instead (status > 128, the trap runs).
  IFS= builtin read -r -d '' __oi_code < <(command base64 -d <<<"$__oi_payload")
  __oi_status=$?
  # Waiting for the decoder also resets bash's waiting state, which a trap that returned while
  # bash waited for a child (an interrupted `sleep`) leaves set: without it, the next busy loop
  # would not run the INT trap. A trapped SIGINT cuts `wait` short; it is never dropped.
  builtin wait $! 2>/dev/null
  __oi_waited=$?
  ((__oi_waited > 128)) && __oi_status=$__oi_waited
  if ((__oi_status <= 128)); then
    __oi_lines=
    __oi_last_line=
    [ "$__oi_flags" = active_lines ] && exec {__oi_lines}>&3
    __oi_cell "$__oi_code" 3>&- 8<&- {__oi_out}>&- {__oi_err}>&-
    __oi_status=$?
    __oi_in_cell=0
    builtin trap - DEBUG
    if [ -n "$__oi_lines" ]; then
      exec {__oi_lines}>&-
      __oi_lines=
    fi
  else
    __oi_status=130
  fi

  until IFS= builtin read -r -u 8 __oi_nonce; do
    (($? > 128)) || exit 0
  done
  if ((__oi_interrupted)); then
    __oi_status=130
    builtin printf '{"type":"error","name":"KeyboardInterrupt","value":"Interrupted","traceback":""}\n' >&3
  fi
  builtin printf '\002oi-end:%s\003' "$__oi_nonce" >&$__oi_out
  builtin printf '\002oi-end:%s\003' "$__oi_nonce" >&$__oi_err
  __oi_interrupted=0
  builtin printf '{"type":"done","nonce":"%s","exit_code":%d}\n' "$__oi_nonce" "$__oi_status" >&3
done

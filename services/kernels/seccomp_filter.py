"""Writes the kernels' seccomp filter, as classic BPF for `bwrap --seccomp FD`, to stdout.

Generated with libseccomp (Debian's python3-seccomp) rather than written by hand, so syscall
numbers, architecture checks and argument comparisons are the library's. Run with Debian's
/usr/bin/python3, which has the binding; it takes no input.

Everything is allowed except the calls below, which fail with EPERM: namespaces (no nested user
namespace, no setns), mounts, io_uring, the kernel keyring, tracing other processes, eBPF,
perf events, kernel modules, kexec and reboot, and a few more that only serve attacks on the
kernel from an unprivileged sandbox. clone3 fails with ENOSYS so that libc falls back to clone,
whose flags the filter can inspect. Only the native ABI is allowed: a 32-bit or x32 system call
kills the process (libseccomp's default for architectures not added to the filter).
"""

import errno
import sys

import seccomp

DENIED = [
    # namespaces and mounts
    "unshare", "setns", "mount", "umount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    # io_uring bypasses the filter for the calls it performs
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    # keyring
    "keyctl", "add_key", "request_key",
    # other processes' memory
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    # eBPF, perf, userfaultfd: frequent kernel exploit primitives
    "bpf", "perf_event_open", "userfaultfd",
    # modules, kexec, reboot, swap, accounting, clocks
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot",
    "swapon", "swapoff", "acct", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    # file handles reach any file of a mounted filesystem
    "open_by_handle_at", "name_to_handle_at",
    # misc privileged or obsolete
    "quotactl", "syslog", "vhangup", "iopl", "ioperm", "lookup_dcookie", "uselib",
    "fanotify_init", "nfsservctl",
]

# CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET
# (CLONE_NEWTIME shares its bit with clone's exit signal and is only honoured by clone3 and unshare).
CLONE_NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)


def main():
    rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for name in DENIED:
        try:
            rules.add_rule(seccomp.ERRNO(errno.EPERM), name)
        except (RuntimeError, ValueError):
            # A name this libseccomp or architecture does not know: nothing to deny.
            pass
    rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    for flag in CLONE_NAMESPACE_FLAGS:
        rules.add_rule(seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    rules.export_bpf(sys.stdout)


main()

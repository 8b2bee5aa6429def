//! moat's seccomp filter, built with `seccompiler` and handed to the sandbox as
//! raw BPF (bwrap's `--add-seccomp-fd`, or the OCI spec for gVisor).
//!
//! Owns the deny list (docs/threat-model.md K4, K9, F8) and nothing else: no allow-listing
//! of ordinary system calls, which would break real agents' tools. Invariant:
//! every program returned here denies, on the host architecture, at least every
//! call in `DENIED` plus the conditional socket/ioctl/clone/personality rules and
//! the setuid/setgid mode rules (chmod, fchmod, fchmodat, fchmodat2, mknod,
//! mknodat, creat, open and openat with S_ISUID or S_ISGID in the mode); and
//! `enosys_filter` answers ENOSYS to the calls whose arguments it cannot read
//! (clone3, openat2), so that libc falls back to the ones it can.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::error::{Result, SandboxError};

/// System calls refused with EPERM whatever their arguments.
pub const DENIED: &[&str] = &[
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "bpf",
    "perf_event_open",
    "keyctl",
    "add_key",
    "request_key",
    "mount",
    "umount2",
    "unshare",
    "setns",
    "pivot_root",
    "chroot",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    "swapon",
    "swapoff",
    "reboot",
    "acct",
    "quotactl",
    "userfaultfd",
    "open_by_handle_at",
    "name_to_handle_at",
    "syslog",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "vhangup",
    // Reaching into another process (K9): descriptors, memory advice, and
    // comparing its kernel objects; with ptrace and process_vm_* above.
    "pidfd_getfd",
    "process_madvise",
    "kcmp",
    "iopl",
    "ioperm",
];

/// Names moat can resolve to numbers: the deny list plus common others that an
/// operator may add through `syscalls.deny`.
fn syscall_number(name: &str) -> Option<i64> {
    let n = match name {
        "ptrace" => libc::SYS_ptrace,
        "process_vm_readv" => libc::SYS_process_vm_readv,
        "process_vm_writev" => libc::SYS_process_vm_writev,
        "io_uring_setup" => libc::SYS_io_uring_setup,
        "io_uring_enter" => libc::SYS_io_uring_enter,
        "io_uring_register" => libc::SYS_io_uring_register,
        "bpf" => libc::SYS_bpf,
        "perf_event_open" => libc::SYS_perf_event_open,
        "keyctl" => libc::SYS_keyctl,
        "add_key" => libc::SYS_add_key,
        "request_key" => libc::SYS_request_key,
        "mount" => libc::SYS_mount,
        "umount2" => libc::SYS_umount2,
        "unshare" => libc::SYS_unshare,
        "setns" => libc::SYS_setns,
        "pivot_root" => libc::SYS_pivot_root,
        "chroot" => libc::SYS_chroot,
        "kexec_load" => libc::SYS_kexec_load,
        "kexec_file_load" => libc::SYS_kexec_file_load,
        "init_module" => libc::SYS_init_module,
        "finit_module" => libc::SYS_finit_module,
        "delete_module" => libc::SYS_delete_module,
        "fsopen" => libc::SYS_fsopen,
        "fsconfig" => libc::SYS_fsconfig,
        "fsmount" => libc::SYS_fsmount,
        "fspick" => libc::SYS_fspick,
        "move_mount" => libc::SYS_move_mount,
        "open_tree" => libc::SYS_open_tree,
        "mount_setattr" => libc::SYS_mount_setattr,
        "swapon" => libc::SYS_swapon,
        "swapoff" => libc::SYS_swapoff,
        "reboot" => libc::SYS_reboot,
        "acct" => libc::SYS_acct,
        "quotactl" => libc::SYS_quotactl,
        "userfaultfd" => libc::SYS_userfaultfd,
        "open_by_handle_at" => libc::SYS_open_by_handle_at,
        "name_to_handle_at" => libc::SYS_name_to_handle_at,
        "syslog" => libc::SYS_syslog,
        "settimeofday" => libc::SYS_settimeofday,
        "clock_settime" => libc::SYS_clock_settime,
        "clock_adjtime" => libc::SYS_clock_adjtime,
        "adjtimex" => libc::SYS_adjtimex,
        "vhangup" => libc::SYS_vhangup,
        "pidfd_getfd" => libc::SYS_pidfd_getfd,
        "process_madvise" => libc::SYS_process_madvise,
        "kcmp" => libc::SYS_kcmp,
        #[cfg(target_arch = "x86_64")]
        "iopl" => libc::SYS_iopl,
        #[cfg(target_arch = "x86_64")]
        "ioperm" => libc::SYS_ioperm,
        // Extras an operator may deny.
        "uname" => libc::SYS_uname,
        "sethostname" => libc::SYS_sethostname,
        "setdomainname" => libc::SYS_setdomainname,
        "personality" => libc::SYS_personality,
        "memfd_create" => libc::SYS_memfd_create,
        "execveat" => libc::SYS_execveat,
        "socket" => libc::SYS_socket,
        "socketpair" => libc::SYS_socketpair,
        "connect" => libc::SYS_connect,
        "bind" => libc::SYS_bind,
        "listen" => libc::SYS_listen,
        "mknod" => libc::SYS_mknod,
        "mknodat" => libc::SYS_mknodat,
        "link" => libc::SYS_link,
        "linkat" => libc::SYS_linkat,
        "symlink" => libc::SYS_symlink,
        "symlinkat" => libc::SYS_symlinkat,
        "inotify_init1" => libc::SYS_inotify_init1,
        "fanotify_init" => libc::SYS_fanotify_init,
        "mbind" => libc::SYS_mbind,
        "migrate_pages" => libc::SYS_migrate_pages,
        "move_pages" => libc::SYS_move_pages,
        "set_mempolicy" => libc::SYS_set_mempolicy,
        "landlock_create_ruleset" => libc::SYS_landlock_create_ruleset,
        _ => return None,
    };
    Some(n)
}

const AF_PACKET: u64 = libc::AF_PACKET as u64;
const AF_VSOCK: u64 = libc::AF_VSOCK as u64;
const AF_KEY: u64 = libc::AF_KEY as u64;
const AF_INET: u64 = libc::AF_INET as u64;
const AF_INET6: u64 = libc::AF_INET6 as u64;
const SOCK_RAW: u64 = libc::SOCK_RAW as u64;
const SOCK_TYPE_MASK: u64 = 0xf;
#[allow(clippy::unnecessary_cast)] // the type of TIOCSTI differs between targets
const TIOCSTI: u64 = libc::TIOCSTI as u64;
const TIOCLINUX: u64 = 0x541C;
/// The mode bits a sandbox may not set on any file (docs/threat-model.md F8): a setuid or
/// setgid file left in a host workspace would run as its owner for anyone.
const SET_ID_BITS: [u64; 2] = [libc::S_ISUID as u64, libc::S_ISGID as u64];
/// fchmodat2 (Linux 6.6): 452 on x86_64 and in the generic table (aarch64);
/// the libc crate does not name it for every target yet.
const SYS_FCHMODAT2: i64 = 452;
const O_CREAT: u64 = libc::O_CREAT as u64;
/// O_TMPFILE without O_DIRECTORY: the bit that makes open create a file.
const O_TMPFILE_BIT: u64 = (libc::O_TMPFILE & !libc::O_DIRECTORY) as u64;
const NAMESPACE_FLAGS: [u64; 8] = [
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWCGROUP as u64,
    0x80, // CLONE_NEWTIME
];

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
        .map_err(|e| SandboxError::Start(format!("seccomp rule: {e}")))
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule> {
    SeccompRule::new(conds).map_err(|e| SandboxError::Start(format!("seccomp rule: {e}")))
}

fn arch() -> Result<TargetArch> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(|_| {
        SandboxError::Refused(format!("no seccomp support for {}", std::env::consts::ARCH))
    })
}

/// One comparison of an argument-dependent rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ArgTest {
    Eq(u64),
    Ne(u64),
    /// `(arg & mask) == value`
    MaskedEq {
        mask: u64,
        value: u64,
    },
}

/// A rule matches (and the call is denied) when every (argument index, test) holds.
pub(crate) type ArgRule = Vec<(u8, ArgTest)>;

/// Denied when the mode (argument `mode`) has S_ISUID or S_ISGID.
fn set_id_mode(mode: u8) -> Vec<ArgRule> {
    SET_ID_BITS
        .iter()
        .map(|b| {
            vec![(
                mode,
                ArgTest::MaskedEq {
                    mask: *b,
                    value: *b,
                },
            )]
        })
        .collect()
}

/// Denied when the call creates a file (O_CREAT or O_TMPFILE in argument
/// `flags`) with S_ISUID or S_ISGID in its mode (argument `mode`). Without
/// either flag the mode argument is not read by the kernel (and may hold
/// anything), so it is not judged.
fn set_id_create(flags: u8, mode: u8) -> Vec<ArgRule> {
    let mut out = Vec::new();
    for f in [O_CREAT, O_TMPFILE_BIT] {
        for b in SET_ID_BITS {
            out.push(vec![
                (flags, ArgTest::MaskedEq { mask: f, value: f }),
                (mode, ArgTest::MaskedEq { mask: b, value: b }),
            ]);
        }
    }
    out
}

/// The calls that set a file's mode, with the rules refusing S_ISUID/S_ISGID
/// (docs/threat-model.md F8). openat2 passes its mode in memory: `enosys_filter`.
fn set_id_rules() -> Vec<(&'static str, i64, Vec<ArgRule>)> {
    let mut v = vec![
        ("fchmod", libc::SYS_fchmod, set_id_mode(1)),
        ("fchmodat", libc::SYS_fchmodat, set_id_mode(2)),
        ("fchmodat2", SYS_FCHMODAT2, set_id_mode(2)),
        ("mknodat", libc::SYS_mknodat, set_id_mode(2)),
        ("openat", libc::SYS_openat, set_id_create(2, 3)),
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([
        ("chmod", libc::SYS_chmod, set_id_mode(1)),
        ("mknod", libc::SYS_mknod, set_id_mode(1)),
        ("creat", libc::SYS_creat, set_id_mode(1)),
        ("open", libc::SYS_open, set_id_create(1, 2)),
    ]);
    v
}

/// The argument-dependent part of the deny list, shared by the BPF filter
/// (bwrap) and the OCI seccomp section (gVisor): (name, number, rules). A call
/// denied outright (`DENIED` or an operator's extra name) keeps that.
pub(crate) fn conditional_rules() -> Vec<(&'static str, i64, Vec<ArgRule>)> {
    use ArgTest::*;
    // socket(): packet, vsock and key sockets, and raw IP sockets.
    let mut socket: Vec<ArgRule> = [AF_PACKET, AF_VSOCK, AF_KEY]
        .iter()
        .map(|f| vec![(0, Eq(*f))])
        .collect();
    for family in [AF_INET, AF_INET6] {
        socket.push(vec![
            (0, Eq(family)),
            (
                1,
                MaskedEq {
                    mask: SOCK_TYPE_MASK,
                    value: SOCK_RAW,
                },
            ),
        ]);
    }
    let mut rules = vec![
        ("socket", libc::SYS_socket, socket),
        // ioctl(): terminal injection.
        (
            "ioctl",
            libc::SYS_ioctl,
            vec![vec![(1, Eq(TIOCSTI))], vec![(1, Eq(TIOCLINUX))]],
        ),
        // clone(): no new namespaces (flags are argument 0 on x86_64 and aarch64).
        (
            "clone",
            libc::SYS_clone,
            NAMESPACE_FLAGS
                .iter()
                .map(|f| {
                    vec![(
                        0,
                        MaskedEq {
                            mask: *f,
                            value: *f,
                        },
                    )]
                })
                .collect(),
        ),
        // personality(): only the plain Linux persona and the query are allowed.
        (
            "personality",
            libc::SYS_personality,
            vec![vec![(0, Ne(0)), (0, Ne(0xffff_ffff))]],
        ),
    ];
    rules.extend(set_id_rules());
    rules
}

/// The names denied outright: `DENIED` plus the policy's `extra`, each checked
/// to be a system call moat knows. Unknown names are an error naming them.
pub(crate) fn denied_outright(extra: &[String]) -> Result<Vec<(&str, i64)>> {
    DENIED
        .iter()
        .copied()
        .chain(extra.iter().map(String::as_str))
        .map(|name| {
            syscall_number(name).map(|nr| (name, nr)).ok_or_else(|| {
                SandboxError::Refused(format!(
                    "syscalls.deny: unknown system call {name:?} (moat resolves the names in its deny list and common ones such as uname, socket, memfd_create)"
                ))
            })
        })
        .collect()
}

/// Compiles the EPERM filter: the fixed deny list, `extra` names, and the
/// argument-dependent rules. Unknown extra names are an error naming them.
pub fn deny_filter(extra: &[String]) -> Result<BpfProgram> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (_, nr) in denied_outright(extra)? {
        rules.insert(nr, Vec::new());
    }
    for (_, nr, conditional) in conditional_rules() {
        if let std::collections::btree_map::Entry::Vacant(e) = rules.entry(nr) {
            let mut compiled = Vec::new();
            for r in conditional {
                let conds = r
                    .iter()
                    .map(|(arg, test)| match *test {
                        ArgTest::Eq(v) => cond(*arg, SeccompCmpOp::Eq, v),
                        ArgTest::Ne(v) => cond(*arg, SeccompCmpOp::Ne, v),
                        ArgTest::MaskedEq { mask, value } => {
                            cond(*arg, SeccompCmpOp::MaskedEq(mask), value)
                        }
                    })
                    .collect::<Result<Vec<_>>>()?;
                compiled.push(rule(conds)?);
            }
            e.insert(compiled);
        }
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch()?,
    )
    .map_err(|e| SandboxError::Start(format!("seccomp filter: {e}")))?;
    BpfProgram::try_from(filter).map_err(|e| SandboxError::Start(format!("seccomp filter: {e}")))
}

/// The calls `enosys_filter` answers with ENOSYS: their arguments are in
/// memory, out of a filter's sight, and libc and the usual runtimes fall back to
/// an older call the first filter judges. `clone3` → `clone` (namespace flags);
/// `openat2` → `openat` (the created file's mode: glibc, Python, coreutils, Rust
/// std and Go never call openat2; systemd and a few others try it first).
pub const ENOSYS_CALLS: &[(&str, i64)] =
    &[("clone3", libc::SYS_clone3), ("openat2", libc::SYS_openat2)];

/// A second filter: the calls of `ENOSYS_CALLS` fail with ENOSYS.
pub fn enosys_filter() -> Result<BpfProgram> {
    let mut rules = BTreeMap::new();
    for (_, nr) in ENOSYS_CALLS {
        rules.insert(*nr, Vec::new());
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch()?,
    )
    .map_err(|e| SandboxError::Start(format!("seccomp filter: {e}")))?;
    BpfProgram::try_from(filter).map_err(|e| SandboxError::Start(format!("seccomp filter: {e}")))
}

/// The program as the kernel's `struct sock_filter[]` bytes, as bwrap reads them.
pub fn to_bytes(prog: &BpfProgram) -> Vec<u8> {
    let mut out = Vec::with_capacity(prog.len() * 8);
    for ins in prog {
        out.extend_from_slice(&ins.code.to_ne_bytes());
        out.push(ins.jt);
        out.push(ins.jf);
        out.extend_from_slice(&ins.k.to_ne_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_denied_name_resolves() {
        for name in DENIED {
            assert!(syscall_number(name).is_some(), "{name}");
        }
        assert!(!deny_filter(&[]).unwrap().is_empty());
        assert!(!enosys_filter().unwrap().is_empty());
    }

    #[test]
    fn set_id_modes_are_refused_and_ordinary_modes_pass() {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "").unwrap();
        let c = |p: &std::path::Path| CString::new(p.as_os_str().as_bytes()).unwrap();
        let (file, new) = (c(&file), c(&dir.path().join("new")));
        let prog = deny_filter(&[]).unwrap();
        // SAFETY: the child makes system calls only and leaves with _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let eperm = |r: libc::c_int| {
                r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
            };
            // SAFETY: prctl, chmod and open on valid C strings, in the child.
            let bits = unsafe {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                let applied = seccompiler::apply_filter(&prog).is_ok();
                [
                    applied,
                    eperm(libc::chmod(file.as_ptr(), 0o4755)),
                    eperm(libc::chmod(file.as_ptr(), 0o2755)),
                    libc::chmod(file.as_ptr(), 0o1755) == 0,
                    eperm(libc::open(
                        new.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY,
                        0o4755,
                    )),
                    // Without O_CREAT the mode is not looked at.
                    libc::open(file.as_ptr(), libc::O_RDONLY, 0o4755) >= 0,
                ]
            };
            let code = bits.iter().rev().fold(0, |acc, b| acc << 1 | *b as i32);
            // SAFETY: leaving the forked child without unwinding.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for the child forked above.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(libc::WEXITSTATUS(status), 0b11_1111, "status {status:#x}");
    }

    /// Each call of `DENIED` with arguments the kernel refuses without doing
    /// anything (a bad descriptor, pointer, flag or magic number, a missing
    /// path), so that without the filter even root gets another answer than
    /// EPERM. (system call number, arguments)
    #[cfg(target_arch = "x86_64")]
    fn harmless(name: &str) -> Option<(i64, [libc::c_long; 6])> {
        let none = c"/moat-k4-no-such-path".as_ptr() as libc::c_long;
        let empty = c"".as_ptr() as libc::c_long;
        let module = c"moat_k4_no_such_module".as_ptr() as libc::c_long;
        let fs = c"moat_k4_no_such_fs".as_ptr() as libc::c_long;
        let (bad, flags, no_pid) = (1, 0xdead_0000, 0x3fff_fff0);
        // SAFETY: getpid has no preconditions.
        let me = unsafe { libc::getpid() } as libc::c_long;
        let a = match name {
            "ptrace" => [2, no_pid, 0, 0, 0, 0], // PEEKDATA of no process: ESRCH
            "process_vm_readv" | "process_vm_writev" => [me, 0, 0, 0, 0, 1], // flags: EINVAL
            "io_uring_setup" => [0, bad, 0, 0, 0, 0],
            "io_uring_enter" | "io_uring_register" | "pidfd_getfd" | "process_madvise" => {
                [-1, 0, 0, 0, 0, 0]
            }
            "bpf" => [1, bad, 32, 0, 0, 0], // MAP_LOOKUP_ELEM, attr unreadable: EFAULT
            "perf_event_open" => [bad, 0, -1, -1, flags, 0],
            "keyctl" => [9999, 0, 0, 0, 0, 0],
            "add_key" | "request_key" => [bad, 0, 0, 0, -2, 0],
            "mount" => [none, none, 0, 0, 0, 0],
            "umount2" => [none, flags, 0, 0, 0, 0],
            "unshare" => [1, 0, 0, 0, 0, 0], // not a namespace flag: EINVAL
            "setns" => [-1, 0, 0, 0, 0, 0],
            "pivot_root" => [none, none, 0, 0, 0, 0],
            "chroot" | "swapoff" | "acct" => [none, 0, 0, 0, 0, 0],
            "swapon" => [none, flags, 0, 0, 0, 0],
            "kexec_load" => [0, 0, 0, flags, 0, 0],
            "kexec_file_load" => [-1, -1, 0, 0, flags, 0],
            "init_module" => [bad, 64, bad, 0, 0, 0],
            "finit_module" => [-1, empty, 0, 0, 0, 0],
            "delete_module" => [module, libc::O_NONBLOCK as libc::c_long, 0, 0, 0, 0],
            "fsopen" => [fs, flags, 0, 0, 0, 0], // before any file system is looked up
            "fsconfig" | "fsmount" => [-1, 0, 0, 0, 0, 0],
            "fspick" | "open_tree" => [-100, none, 0, 0, 0, 0],
            "move_mount" => [-1, empty, -100, none, flags, 0],
            "mount_setattr" => [-100, none, 0, 0, 0, 0],
            "reboot" => [0, 0, 0, 0, 0, 0], // wrong magic numbers: EINVAL
            "quotactl" => [0xdead, 0, 0, 0, 0, 0],
            "userfaultfd" => [flags, 0, 0, 0, 0, 0],
            "open_by_handle_at" => [-1, bad, 0, 0, 0, 0],
            "name_to_handle_at" => [-100, none, bad, bad, 0, 0],
            "syslog" => [9999, 0, 0, 0, 0, 0],
            "settimeofday" | "adjtimex" => [bad, 0, 0, 0, 0, 0],
            "clock_settime" | "clock_adjtime" => [9999, bad, 0, 0, 0, 0],
            "vhangup" => [0; 6], // the child has no controlling terminal
            "kcmp" => [me, me, 99, 0, 0, 0],
            "iopl" => [4, 0, 0, 0, 0, 0],
            "ioperm" => [0x10000, 1, 1, 0, 0, 0],
            _ => return None,
        };
        Some((syscall_number(name)?, a))
    }

    /// The errno of every harmless call (0 for success), made by a forked
    /// child that first applies `prog` (if any).
    #[cfg(target_arch = "x86_64")]
    fn errnos_in_child(prog: Option<&BpfProgram>) -> Vec<i32> {
        let calls: Vec<(i64, [libc::c_long; 6])> = DENIED
            .iter()
            .map(|n| harmless(n).unwrap_or_else(|| panic!("no harmless call for {n}: add one")))
            .collect();
        let mut fds = [0; 2];
        // SAFETY: pipe fills the two descriptors.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the child makes system calls only and leaves with _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: raw system calls on prepared memory, in the child.
            unsafe {
                libc::setsid();
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                if let Some(p) = prog {
                    if seccompiler::apply_filter(p).is_err() {
                        libc::_exit(2);
                    }
                }
                for (nr, a) in &calls {
                    let r = libc::syscall(*nr, a[0], a[1], a[2], a[3], a[4], a[5]);
                    let e: i32 = if r < 0 { *libc::__errno_location() } else { 0 };
                    libc::write(fds[1], (&e as *const i32).cast(), 4);
                }
                libc::_exit(0);
            }
        }
        // SAFETY: closing our copy of the write end.
        unsafe { libc::close(fds[1]) };
        // SAFETY: the read end is ours alone from here.
        let mut out = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[0]) };
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut out, &mut bytes).unwrap();
        let mut status = 0;
        // SAFETY: waiting for the child forked above.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(status, 0, "the probing child failed");
        let errnos: Vec<i32> = bytes
            .chunks(4)
            .map(|c| i32::from_ne_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(errnos.len(), calls.len());
        errnos
    }

    /// Many denied calls are also refused to an unprivileged sandbox by the
    /// kernel's capability checks, with the same EPERM: inside a sandbox a
    /// name missing from the filter would go unnoticed. Here, as root (every
    /// capability present), each is made without the filter (never EPERM)
    /// and under it (always EPERM), so every name of `DENIED` is shown to be
    /// in the compiled program.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_denied_call_is_refused_by_the_filter_itself() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(
                std::env::var_os("MOAT_TEST_REQUIRE_ALL").is_none(),
                "this test needs root (every capability), MOAT_TEST_REQUIRE_ALL is set"
            );
            eprintln!("skipped: needs root");
            return;
        }
        let prog = deny_filter(&[]).unwrap();
        let open = errnos_in_child(None);
        let shut = errnos_in_child(Some(&prog));
        for ((name, o), s) in DENIED.iter().zip(&open).zip(&shut) {
            assert_ne!(
                *o,
                libc::EPERM,
                "{name}: EPERM without the filter, the probe proves nothing"
            );
            assert_eq!(
                *s,
                libc::EPERM,
                "{name}: not refused by the filter (errno {s}; {o} without it)"
            );
        }
    }

    #[test]
    fn unknown_extra_names_are_refused_by_name() {
        let e = deny_filter(&["frobnicate".into()]).unwrap_err().to_string();
        assert!(e.contains("frobnicate"), "{e}");
        assert!(deny_filter(&["uname".into()]).is_ok());
    }
}

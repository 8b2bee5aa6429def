//! moat's seccomp filter, built with `seccompiler` and handed to the sandbox as
//! raw BPF (bwrap's `--add-seccomp-fd`, or the OCI spec for gVisor).
//!
//! Owns the deny list (docs/threat-model.md K4) and nothing else: no allow-listing of
//! ordinary system calls, which would break real agents' tools. Invariant: every
//! program returned here denies, on the host architecture, at least every call in
//! `DENIED` plus the conditional socket/ioctl/clone/personality rules.

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
    "pidfd_getfd",
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
        #[cfg(target_arch = "x86_64")]
        "iopl" => libc::SYS_iopl,
        #[cfg(target_arch = "x86_64")]
        "ioperm" => libc::SYS_ioperm,
        // Extras an operator may deny.
        "uname" => libc::SYS_uname,
        "sethostname" => libc::SYS_sethostname,
        "setdomainname" => libc::SYS_setdomainname,
        "kcmp" => libc::SYS_kcmp,
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
    vec![
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
    ]
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

/// A second filter: `clone3` fails with ENOSYS, so libc falls back to `clone`,
/// whose flags the first filter can inspect (clone3 passes them in memory).
pub fn clone3_filter() -> Result<BpfProgram> {
    let mut rules = BTreeMap::new();
    rules.insert(libc::SYS_clone3, Vec::new());
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
        assert!(!clone3_filter().unwrap().is_empty());
    }

    #[test]
    fn unknown_extra_names_are_refused_by_name() {
        let e = deny_filter(&["frobnicate".into()]).unwrap_err().to_string();
        assert!(e.contains("frobnicate"), "{e}");
        assert!(deny_filter(&["uname".into()]).is_ok());
    }
}

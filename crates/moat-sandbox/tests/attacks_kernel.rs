//! docs/threat-model.md, processes and kernel (K1-K8), run for real against every
//! backend: privileges, setuid, /proc, denied system calls, fork, memory and
//! CPU bombs, timeouts, and what is left after release or a crash.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::host::*;
use common::kernel::{k4_expected, SYSCALLS_PY};
use common::*;
use moat_policy::{BackendKind, ByteSize};
use moat_sandbox::{Lease, LeaseOptions, RunSpec, Termination, WorkspaceSource};

fn cmd(program: &str, args: &[&str]) -> std::process::ExitStatus {
    std::process::Command::new(program)
        .args(args)
        .status()
        .unwrap()
}

/// The lease's cgroup directory of one controller (bwrap: host cgroups).
fn cgroup_of(lease: &Lease, controller: &str) -> Option<PathBuf> {
    lease
        .cgroup_paths()
        .into_iter()
        .find(|p| p.components().any(|c| c.as_os_str() == controller))
        .or_else(|| {
            // cgroup v2: one directory holds every controller.
            lease
                .cgroup_paths()
                .into_iter()
                .find(|p| p.join("cgroup.controllers").exists())
        })
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// A host process the test starts, as a witness that the host keeps working.
struct Witness(std::process::Child);
impl Witness {
    fn start() -> Witness {
        Witness(
            std::process::Command::new("sleep")
                .arg("600")
                .spawn()
                .unwrap(),
        )
    }
    fn alive(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }
}
impl Drop for Witness {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The host still forks and another lease still runs commands.
fn host_and_neighbours_work(kind: BackendKind) {
    for _ in 0..10 {
        assert!(cmd("true", &[]).success(), "the host cannot fork");
    }
    let (_e, mut other) = lease(kind);
    assert_eq!(sh(&mut other, "echo neighbour").stdout, "neighbour\n");
}

/// Swap in use on the host, in KiB.
fn swap_used_kib() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap();
    let field = |k: &str| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    field("SwapTotal:") - field("SwapFree:")
}

// K9: x86_64 code that, written over PID 1's resume address while it waits
// for the command, answers the host on descriptor 3 as moat-init would:
// "exited 0" for the command, then "started" and "exited 0" for every later
// request without running it (exit_group if descriptor 3 is no socket).
// Assembled from: lea rsi,[exited0]; call send5; again: recvfrom(3, rsp-2048,
// 1024); jle die; send5(started); send5(exited0); jmp again; die: exit_group(0);
// send5: sendto(3, rsi, 5, MSG_NOSIGNAL).
const K9_FORGER: &str = "488d3572000000e84a000000bf03000000488db42400f8ffffba000400004531d24531c04531c9b82d0000000f054885c07e1a488d353a000000e817000000488d3533000000e80b000000ebbf31ffb8e70000000f05bf03000000ba0500000041ba004000004531c04531c9b82c0000000f05c353010000005800000000";

// K9: every way a command (here a grandchild of PID 1) could reach into PID 1.
// The forgery itself (writing K9_FORGER at PID 1's resume address) runs last.
const K9_PY: &str = r##"
import ctypes, errno, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
CODE = bytes.fromhex(sys.argv[1])
def name_of(e):
    return errno.errorcode.get(e, str(e))
def show(name, f):
    try:
        f()
        print(name, "OK", flush=True)
    except OSError as ex:
        print(name, name_of(ex.errno), flush=True)
def sc(name, nr, *a):
    r = libc.syscall(nr, *a)
    print(name, "OK" if r >= 0 else name_of(ctypes.get_errno()), flush=True)
    return r
def read(p):
    with open(p, "rb") as f:
        f.read(4096)
def write(p, data):
    fd = os.open(p, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
def opened(p, flags):
    os.close(os.open(p, flags))

show("mem_open_ro", lambda: opened("/proc/1/mem", os.O_RDONLY))
show("mem_open_rw", lambda: opened("/proc/1/mem", os.O_RDWR))
show("task_mem_open_rw", lambda: opened("/proc/1/task/1/mem", os.O_RDWR))
for f in ("environ", "maps", "syscall", "auxv", "pagemap"):
    show("read_" + f, lambda f=f: read("/proc/1/" + f))
for f in ("root", "cwd", "exe"):
    show("link_" + f, lambda f=f: os.readlink("/proc/1/" + f))
show("list_root", lambda: os.listdir("/proc/1/root/"))
show("list_fd", lambda: os.listdir("/proc/1/fd"))
for fd in range(4):
    show("open_fd%d" % fd, lambda fd=fd: opened("/proc/1/fd/%d" % fd, os.O_RDONLY))
for f, data in (("comm", b"pwned"), ("oom_score_adj", b"1000"), ("coredump_filter", b"0x7f"),
                ("clear_refs", b"1"), ("timerslack_ns", b"1")):
    show("write_" + f, lambda f=f, data=data: write("/proc/1/" + f, data))

class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
buf = ctypes.create_string_buffer(64)
local = iovec(ctypes.cast(buf, ctypes.c_void_p), 64)
remote = iovec(ctypes.cast(buf, ctypes.c_void_p), 64)
sc("ptrace_attach", 101, 16, 1, 0, 0)
sc("ptrace_seize", 101, 0x4206, 1, 0, 0)
sc("process_vm_readv", 310, 1, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
sc("process_vm_writev", 311, 1, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
pidfd = sc("pidfd_open", 434, 1, 0)
sc("pidfd_getfd", 438, pidfd, 3, 0)
sc("process_madvise", 440, pidfd, ctypes.byref(local), 1, 20, 0)
sc("kcmp", 312, 1, os.getpid(), 0, 3, 0)
if pidfd >= 0:
    os.close(pidfd)

# The forgery: PID 1 waits for our shell in wait4; its resume address is the
# last field of /proc/1/syscall.
pc = None
try:
    pc = int(open("/proc/1/syscall").read().split()[-1], 16)
except (OSError, ValueError, IndexError):
    pass
def forge():
    fd = os.open("/proc/1/mem", os.O_RDWR)
    try:
        if pc is None:
            raise OSError(errno.ENODATA, "no resume address")
        os.pwrite(fd, CODE, pc)
    finally:
        os.close(fd)
show("forge", forge)
"##;

/// What differs under gVisor, where PID 1 is the command's own shell (one
/// container per command): its descendants may read what is the command's own
/// (environ, maps, its descriptors 0-2, oom_score_adj), but not write its memory
/// (gVisor refuses ptrace access to an ancestor); some files do not exist, and
/// the sentry has no pidfd calls. Nothing outlives the command.
const K9_GVISOR: &[(&str, &str)] = &[
    ("read_environ", "OK"),
    ("read_maps", "OK"),
    ("read_syscall", "ENOENT"),
    ("read_auxv", "OK"),
    ("read_pagemap", "ENOENT"),
    ("list_fd", "OK"),
    ("open_fd0", "OK"),
    ("open_fd1", "OK"),
    ("open_fd2", "OK"),
    ("open_fd3", "ENOENT"),
    ("write_oom_score_adj", "OK"),
    ("write_coredump_filter", "ENOENT"),
    ("write_clear_refs", "ENOENT"),
    ("write_timerslack_ns", "ENOENT"),
    ("pidfd_open", "ENOSYS"),
    ("pidfd_getfd", "EPERM|ENOSYS"),
    ("process_madvise", "EPERM|ENOSYS"),
];

// K9: signals to PID 1, SIGKILL last (pidfd_send_signal where there are pidfds).
const K9_SIGNALS_PY: &str = r##"
import os, signal
try:
    pidfd = os.pidfd_open(1)
    signal.pidfd_send_signal(pidfd, signal.SIGSTOP)
    print("pidfd_send_signal OK", flush=True)
except OSError as ex:
    print("pidfd_send_signal", ex.errno, flush=True)
for sig in (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
            signal.SIGUSR1, signal.SIGSEGV, signal.SIGPIPE, signal.SIGKILL):
    try:
        os.kill(1, sig)
        print("kill_" + sig.name, "OK", flush=True)
    except OSError as ex:
        print("kill_" + sig.name, ex.errno, flush=True)
"##;

per_backend! {
    // ---- K1 -------------------------------------------------------------
    attack_k1_no_new_privs_no_capabilities_and_no_host_root => |kind| {
        let (_e, mut l) = lease(kind);
        l.start().unwrap();
        let pids_dir = cgroup_of(&l, "pids").expect("the lease has no host cgroup");
        let ws = l.workspace_dir();
        // Inside, for the command and a grandchild: prctl, capget(2) and
        // /proc/self/status (gVisor's status has no NoNewPrivs line).
        let code = r##"
import ctypes, os, subprocess, sys, time
libc = ctypes.CDLL(None, use_errno=True)
who = sys.argv[1]
print(who, "nnp", libc.prctl(39, 0, 0, 0, 0))
hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)
data = (ctypes.c_uint32 * 6)()
r = libc.syscall(125, hdr, data)
print(who, "capget", r, data[0] | data[3], data[1] | data[4], data[2] | data[5])
for line in open("/proc/self/status").read().splitlines():
    k = line.split(":")[0]
    if k in ("CapEff", "CapPrm", "CapAmb", "CapInh", "NoNewPrivs"):
        print(who, "status", k, line.split()[1])
print(who, "ids", os.getresuid(), os.getresgid(), 0 in os.getgroups())
sys.stdout.flush()
if who == "self":
    code = open("/proc/self/cmdline", "rb").read().split(b"\0")[2].decode()
    subprocess.run(["/bin/sh", "-c", 'python3 -c "$0" grandchild', code])
    open("/workspace/ready", "w").close()
    while not os.path.exists("/workspace/release"):
        time.sleep(0.05)
"##;
        let (o, members) = std::thread::scope(|s| {
            let cmd = s.spawn(|| run(&mut l, RunSpec { timeout: Some(Duration::from_secs(60)), ..RunSpec::new(["/usr/bin/python3", "-c", code, "self"]) }));
            assert!(wait_until(Duration::from_secs(30), || ws.join("ready").exists()), "the command did not start");
            // From the host, while it runs: every process of the lease's cgroup.
            let pids: Vec<u32> = std::fs::read_to_string(pids_dir.join("cgroup.procs")).unwrap().lines().filter_map(|l| l.parse().ok()).collect();
            let mut members: Vec<Proc> = pids.iter().filter_map(|p| proc_info(*p)).collect();
            // Under gVisor the agent's code runs in the sentry's descendants too.
            let sentries: Vec<u32> = members.iter().filter(|p| p.cmdline.starts_with("runsc-sandbox")).map(|p| p.pid).collect();
            for p in tree(&sentries) {
                if !members.iter().any(|m| m.pid == p.pid) {
                    members.push(p);
                }
            }
            std::fs::write(ws.join("release"), "").unwrap();
            (cmd.join().unwrap(), members)
        });
        assert_eq!(o.code(), 0, "{}", o.stderr);
        for who in ["self", "grandchild"] {
            let mine: Vec<&str> = o.stdout.lines().filter_map(|l| l.strip_prefix(who)?.strip_prefix(' ')).collect();
            assert!(mine.contains(&"nnp 1"), "{who}: {}", o.stdout);
            assert!(mine.contains(&"capget 0 0 0 0"), "{who}: {}", o.stdout);
            assert!(mine.contains(&"ids (1000, 1000, 1000) (1000, 1000, 1000) False"), "{who}: {}", o.stdout);
            for l in mine.iter().filter(|l| l.starts_with("status ")) {
                let want = if l.starts_with("status NoNewPrivs") { "1" } else { "0000000000000000" };
                assert_eq!(l.split(' ').nth(2), Some(want), "{who}: {l}");
            }
            let status = mine.iter().filter(|l| l.starts_with("status Cap")).count();
            assert!(status >= 3 || kind == BackendKind::Gvisor, "{who}: {}", o.stdout);
        }
        assert!(!members.is_empty(), "no host process in the lease's cgroup");
        if kind == BackendKind::Bwrap {
            // bwrap, moat-init and the commands: all the lease's own uid, no capability.
            assert!(l.host_uid() >= moat_sandbox::storage::UID_BASE);
            for p in &members {
                assert_eq!((p.uids, p.gids), ([l.host_uid(); 4], [l.host_uid(); 4]), "{p:?}");
                assert_eq!(p.cap_eff, 0, "{p:?}");
            }
            assert!(members.iter().any(|p| p.cmdline.contains("grandchild") || p.cmdline.ends_with("self")));
        } else {
            // gVisor: runsc and its gofer are host root by design; the agent's
            // code runs in the sentry and its ptrace stubs, which must not be.
            let sentry: Vec<&Proc> = members.iter().filter(|p| p.cmdline.starts_with("runsc-sandbox")).collect();
            assert_eq!(sentry.len(), 1, "{members:?}");
            let guest: Vec<&Proc> = members.iter().filter(|p| p.pid == sentry[0].pid || p.ppid == sentry[0].pid).collect();
            assert!(guest.len() >= 2, "no stub processes under the sentry: {members:?}");
            for p in &guest {
                assert!(!p.uids.contains(&0) && !p.gids.contains(&0), "agent code runs as host root: {p:?}");
            }
        }
    };

    // ---- K2 -------------------------------------------------------------
    attack_k2_setuid_binaries_give_no_privilege => |kind| {
        let e = engine(kind);
        let ws = scratch_dir("k2");
        // Root-owned setuid and setgid copies planted in the workspace (as a
        // template or an earlier compromise could), and one with file capabilities.
        let python = std::fs::canonicalize("/usr/bin/python3").unwrap();
        for (name, mode) in [("suid-python", "6755"), ("suid-sleep", "6755")] {
            let src = if name == "suid-python" { python.clone() } else { PathBuf::from("/usr/bin/sleep") };
            std::fs::copy(&src, ws.0.join(name)).unwrap();
            assert!(cmd("chmod", &[mode, ws.0.join(name).to_str().unwrap()]).success());
        }
        std::fs::copy(&python, ws.0.join("cap-python")).unwrap();
        let setcap = cmd("setcap", &["cap_setuid,cap_sys_admin,cap_dac_override+ep", ws.0.join("cap-python").to_str().unwrap()]).success();
        assert!(setcap, "setcap failed on the host");
        assert!(cmd("chown", &["4242:4242", ws.0.to_str().unwrap()]).success());
        let mut l = e.lease(policy(kind), LeaseOptions { workspace: WorkspaceSource::Host(ws.0.clone()), ..Default::default() }).unwrap();
        // sleep sums its arguments: a unique number marks the process.
        let marker = format!("600.{}", moat_sandbox::storage::random_u64() % 1_000_000_000);
        let o = sh(&mut l, &format!(r##"
python3 -c 'import os, stat; print(stat.filemode(os.stat("suid-python").st_mode))' 
./suid-python -c 'import os; print("suid", os.getresuid(), os.getresgid())'
./suid-python -c 'import os
try:
    os.setuid(0); print("setuid0 OK")
except OSError as e: print("setuid0", e.errno)'
./cap-python -c 'import os
s = open("/proc/self/status").read()
print("cap", [l.split()[1] for l in s.splitlines() if l.startswith(("CapEff", "CapPrm"))])
try:
    os.setuid(0); print("cap_setuid0 OK")
except OSError as e: print("cap_setuid0", e.errno)'
./suid-sleep {marker} 2>/dev/null &
sleep 0.3
grep -E '^(Uid|Gid):' /proc/$!/status | tr -s '\t' ' '
su -c id root </dev/null; echo "su=$?"
su root -c 'id -u' </dev/null 2>/dev/null | grep -c '^0$'
if command -v sudo >/dev/null; then sudo -n true; echo "sudo=$?"; else echo "sudo=absent"; fi
mount -t tmpfs none /tmp; echo "mount=$?"
cp /usr/bin/passwd ./passwd-copy && chmod u+s ./passwd-copy 2>/dev/null; python3 -c 'import os, stat; print(stat.filemode(os.stat("passwd-copy").st_mode))' 
./passwd-copy -S root; echo "passwd=$?"
cp /usr/bin/id ./myid; chmod 6755 ./myid 2>/dev/null; chmod 755 ./myid && ./myid -u && ./myid -g
python3 -c 'import os
open("own-suid", "w").close()
try:
    os.chmod("own-suid", 0o6755)
except OSError as e: print("own_chmod", e.errno)
print("own_mode", oct(os.stat("own-suid").st_mode & 0o7777))'
"##));
        // bwrap: EINVAL, uid 0 does not even exist in the sandbox's user
        // namespace; gVisor's kernel answers EPERM.
        let (setuid_errno, cap_setuid_errno) = if kind == BackendKind::Bwrap {
            ("setuid0 22", "cap_setuid0 22")
        } else {
            ("setuid0 1", "cap_setuid0 1")
        };
        // sudo must be there to be tried (scripts/setup installs it); without
        // it the leg is skipped only outside CI.
        let host_sudo = Path::new("/usr/bin/sudo").exists();
        if !host_sudo && std::env::var_os("MOAT_TEST_REQUIRE_ALL").is_some() {
            panic!("sudo is not installed: the K2 sudo leg needs it (scripts/setup installs it)");
        }
        let sudo_want = if host_sudo { "sudo=1" } else { "sudo=absent" };
        let want = [
            "-rwsr-sr-x",
            "suid (1000, 1000, 1000) (1000, 1000, 1000)",
            setuid_errno,
            "cap ['0000000000000000', '0000000000000000']",
            cap_setuid_errno,
            "Uid: 1000 1000 1000 1000",
            "Gid: 1000 1000 1000 1000",
            "su=1",
            "0",
            sudo_want,
            "mount=32",
            // Setting setuid/setgid bits is refused (docs/threat-model.md F8,
            // attacks_setuid.rs); the copies run unprivileged anyway.
            "-rwxr-xr-x",
            "passwd=1",
            "1000",
            "1000",
            "own_chmod 1",
            "own_mode 0o644",
        ];
        assert_eq!(o.stdout.lines().collect::<Vec<_>>(), want, "stderr: {}", o.stderr);
        assert!(o.stderr.contains("su: "), "{}", o.stderr);
        if host_sudo {
            // Refused because of no_new_privs (K2's mitigation), not for want of a password.
            assert!(o.stderr.contains("sudo: The \"no new privileges\" flag is set"), "{}", o.stderr);
        }
        assert!(o.stderr.contains("passwd-copy: You may not view or modify password information for root."), "{}", o.stderr);
        assert!(o.stderr.contains("must be superuser") || o.stderr.contains("only root"), "{}", o.stderr);
        if kind == BackendKind::Bwrap {
            // From the host, the setuid-root sleep runs as the lease's uid.
            let p = procs_with(&marker);
            assert_eq!(p.len(), 1, "{p:?}");
            assert_eq!(p[0].uids, [l.host_uid(); 4]);
            assert_eq!(p[0].gids, [l.host_uid(); 4]);
            assert_eq!(p[0].cap_eff, 0);
        }
        let ids = LeaseIds::of(&e, &l);
        l.destroy().unwrap();
        assert!(procs_with(&marker).is_empty());
        assert!(procs_of_uid(ids.uid).is_empty());
        // The planted binaries are unchanged (still root's, still setuid).
        let m = std::fs::metadata(ws.0.join("suid-python")).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((m.uid(), m.mode() & 0o7777), (0, 0o6755));
    };

    // ---- K3 -------------------------------------------------------------
    attack_k3_proc_shows_only_the_sandbox => |kind| {
        let (_e, mut l) = lease(kind);
        let secret = token("k3-env");
        // sleep sums its arguments: a unique number marks the process.
        let host_marker = format!("600.{}", moat_sandbox::storage::random_u64() % 1_000_000_000);
        let mut host = std::process::Command::new("sleep")
            .arg(&host_marker)
            .env("MOAT_K3_SECRET", &secret)
            .spawn()
            .unwrap();
        let host_pid = host.id();
        let my_pid = std::process::id();
        let host_init = std::fs::read("/proc/1/cmdline").unwrap();
        let host_init = String::from_utf8_lossy(&host_init).replace('\0', " ");
        let code = r##"
import os, json, sys
P = json.loads(sys.argv[1])
pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
print("count", len(pids))
cmds = {}
for p in pids:
    try:
        cmds[p] = open("/proc/%d/cmdline" % p, "rb").read().replace(b"\0", b" ").decode().strip()
    except OSError:
        pass
print("cmdlines", json.dumps(cmds))
print("init_is_host_init", "yes" if cmds.get(1) == P["host_init"].strip() else "no")
hits = []
for p in pids:
    for f in ("environ", "cmdline"):
        try:
            if P["secret"].encode() in open("/proc/%d/%s" % (p, f), "rb").read() and p != os.getpid():
                hits.append("%d/%s" % (p, f))
        except OSError:
            pass
print("secret_seen", ",".join(hits) or "none")
for name, pid in [("host_sleep", P["host_pid"]), ("test_process", P["my_pid"])]:
    for f in ("environ", "cmdline", "status"):
        try:
            open("/proc/%d/%s" % (pid, f), "rb").read()
            print(name + "_" + f, "OK")
        except OSError as e:
            print(name + "_" + f, "ENOENT" if e.errno == 2 else e.errno)
    try:
        os.kill(pid, 0)
        print(name + "_kill", "OK")
    except OSError as e:
        print(name + "_kill", "ESRCH" if e.errno == 3 else e.errno)
# Under bwrap PID 1 (moat-init) is not dumpable: its root is out of reach (K9).
try:
    print("root_link", os.readlink("/proc/1/root"))
    print("root_same", "yes" if sorted(os.listdir("/proc/1/root")) == sorted(os.listdir("/")) else "no")
except PermissionError:
    print("root_link", "EACCES")
    print("root_same", "EACCES")
for name, p in [("shadow", "/proc/1/root/etc/shadow"), ("root_home", "/proc/1/root/root"), ("cwd_up", "/proc/1/cwd/../../root")]:
    print("exists_" + name, os.path.exists(p))
"##;
        let arg = serde_json::json!({"secret": secret, "host_pid": host_pid, "my_pid": my_pid, "host_init": host_init});
        let o = run(&mut l, RunSpec::new(["/usr/bin/python3".to_string(), "-c".into(), code.to_string(), arg.to_string()]));
        // The host process was there all along (the checks below are not vacuous).
        assert!(host.try_wait().unwrap().is_none(), "the host witness died");
        assert_eq!(procs_with(&host_marker).len(), 1);
        let _ = host.kill();
        let _ = host.wait();
        let got = pairs(&o.stdout);
        // init and this python: nothing else lives in the sandbox, nothing of the host shows.
        let count: usize = got["count"].parse().unwrap();
        assert!(count <= 3, "{}", o.stdout);
        let cmds: BTreeMap<String, String> = serde_json::from_str(&got["cmdlines"]).unwrap();
        for c in cmds.values() {
            assert!(c.starts_with("/run/moat/init") || c.starts_with("/usr/bin/python3 -c"), "foreign process {c:?}");
        }
        expect_all(&o, &[
            ("init_is_host_init", "no"),
            ("secret_seen", "none"),
            ("host_sleep_environ", "ENOENT"),
            ("host_sleep_cmdline", "ENOENT"),
            ("host_sleep_status", "ENOENT"),
            ("host_sleep_kill", "ESRCH"),
            ("test_process_environ", "ENOENT"),
            ("test_process_cmdline", "ENOENT"),
            ("test_process_status", "ENOENT"),
            ("test_process_kill", "ESRCH"),
            ("root_link", if kind == BackendKind::Bwrap { "EACCES" } else { "/" }),
            ("root_same", if kind == BackendKind::Bwrap { "EACCES" } else { "yes" }),
            ("exists_shadow", "False"),
            ("exists_root_home", "False"),
            ("exists_cwd_up", "False"),
        ]);
        assert!(host_pid > 3 && my_pid > 3, "host pids too small to tell apart");
    };

    // ---- K9 -------------------------------------------------------------
    attack_k9_pid1_cannot_be_read_written_traced_or_stopped => |kind| {
        if !cfg!(target_arch = "x86_64") {
            panic!("the K9 script uses x86_64 system call numbers and code; port it to this architecture");
        }
        let (_e, mut l) = lease(kind);
        let snap = HostSnapshot::take(&[]);
        // The command is a shell (exit 3) whose child attacks PID 1: moat-init
        // under bwrap, the shell itself under gVisor (one container per command).
        let attack = run(&mut l, RunSpec {
            timeout: Some(Duration::from_secs(60)),
            ..RunSpec::new(["/bin/sh", "-c", "python3 -c \"$0\" \"$1\"; exit 3", K9_PY, K9_FORGER])
        });
        // True statuses, first: the attack's own and a later command's.
        assert_eq!(attack.outcome.termination, Termination::Exited(3), "the attack command's status was forged or lost: {}\n{}", attack.stdout, attack.stderr);
        let later = sh(&mut l, "echo later; exit 7");
        assert_eq!((later.outcome.termination.clone(), later.stdout.as_str()), (Termination::Exited(7), "later\n"), "a later command's status was forged: {}", later.stderr);
        let denied = "EACCES|EPERM";
        let mut expected: Vec<(&str, &str)> = vec![
            ("mem_open_ro", denied), ("mem_open_rw", denied), ("task_mem_open_rw", denied),
            ("read_environ", denied), ("read_maps", denied), ("read_syscall", denied),
            ("read_auxv", denied), ("read_pagemap", denied),
            ("link_root", denied), ("link_cwd", denied), ("link_exe", denied), ("list_root", denied),
            ("list_fd", denied), ("open_fd0", denied), ("open_fd1", denied), ("open_fd2", denied), ("open_fd3", denied),
            ("write_comm", denied), ("write_oom_score_adj", denied), ("write_coredump_filter", denied),
            ("write_clear_refs", denied), ("write_timerslack_ns", denied),
            ("ptrace_attach", "EPERM"), ("ptrace_seize", "EPERM"),
            ("process_vm_readv", "EPERM"), ("process_vm_writev", "EPERM"),
            ("pidfd_open", "OK"), ("pidfd_getfd", "EPERM"), ("process_madvise", "EPERM"), ("kcmp", "EPERM"),
            ("forge", denied),
        ];
        if kind == BackendKind::Gvisor {
            for e in expected.iter_mut() {
                if let Some(v) = K9_GVISOR.iter().find(|(n, _)| *n == e.0) {
                    e.1 = v.1;
                }
            }
        }
        expect_all(&attack, &expected);
        // Signals: moat-init, as its namespace's init without handlers, never
        // sees them. Under gVisor PID 1 is the command's own shell, which a
        // SIGKILL from inside ends: its true status, and the next command is a
        // new container.
        let signals = run(&mut l, RunSpec {
            timeout: Some(Duration::from_secs(60)),
            ..RunSpec::new(["/bin/sh", "-c", "python3 -c \"$0\"; exit 4", K9_SIGNALS_PY])
        });
        let want = if kind == BackendKind::Bwrap { Termination::Exited(4) } else { Termination::Signaled(9) };
        assert_eq!(signals.outcome.termination, want, "{}\n{}", signals.stdout, signals.stderr);
        if kind == BackendKind::Bwrap {
            assert!(signals.stdout.contains("kill_SIGKILL OK") && signals.stdout.contains("pidfd_send_signal OK"), "{}", signals.stdout);
        }
        let again = sh(&mut l, "echo again; exit 5");
        assert_eq!((again.outcome.termination, again.stdout.as_str()), (Termination::Exited(5), "again\n"));
        snap.assert_unchanged();
    };

    // ---- K4 -------------------------------------------------------------
    attack_k4_denied_syscalls_fail_with_eperm => |kind| {
        if !cfg!(target_arch = "x86_64") {
            panic!("the K4 script uses x86_64 system call numbers; port it to this architecture");
        }
        let (_e, mut l) = lease(kind);
        let snap = HostSnapshot::take(&[]);
        let o = run(&mut l, RunSpec::new(["/usr/bin/python3", "-c", SYSCALLS_PY]));
        let expected = k4_expected(kind);
        expect_all(&o, &expected);
        assert_eq!(o.code(), 0, "{}", o.stderr);
        // The command-line tools fail the same way.
        let o = sh(&mut l, "unshare -Ur true; echo \"unshare_user=$?\"; unshare -m true; echo \"unshare_mount=$?\"; unshare -n true; echo \"unshare_net=$?\"");
        assert_eq!(o.stdout, "unshare_user=1\nunshare_mount=1\nunshare_net=1\n");
        assert_eq!(o.stderr.matches("unshare failed: Operation not permitted").count(), 3, "{}", o.stderr);
        snap.assert_unchanged();
    };

    // ---- K5 -------------------------------------------------------------
    attack_k5_fork_bomb_is_stopped_by_the_pids_limit => |kind| {
        let e = engine(kind);
        let mut p = policy(kind);
        p.limits.pids = 64;
        let mut l = e.lease(p, LeaseOptions::default()).unwrap();
        let mut witness = Witness::start();
        // A fork loop that counts: fork fails with EAGAIN before 64 processes.
        let o = py(&mut l, r##"
import os, time, errno
made, errs = 0, set()
deadline = time.time() + 3
while time.time() < deadline and made < 1000:
    try:
        pid = os.fork()
    except OSError as e:
        errs.add(errno.errorcode[e.errno])
        if len(errs) and made > 0:
            break
        continue
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    made += 1
print("made", made)
print("errors", ",".join(sorted(errs)))
"##);
        let got = pairs(&o.stdout);
        let made: u32 = got.get("made").unwrap_or_else(|| panic!("{}\n{}", o.stdout, o.stderr)).parse().unwrap();
        assert!(made > 8 && made < 64, "forked {made} processes: {}", o.stdout);
        assert_eq!(got["errors"], "EAGAIN", "{}", o.stdout);
        l.stop();

        // The classic bomb, twice: bash's `:(){ :|:& };:` and a POSIX-named one.
        for bomb in [":(){ :|:& };:; sleep 30", "bomb() { bomb | bomb & }; bomb; sleep 30"] {
            l.start().unwrap();
            let pids_dir = cgroup_of(&l, "pids");
            let roots = l.host_pids();
            let stop = std::sync::atomic::AtomicBool::new(false);
            let (outcome, max_procs, max_current, events) = std::thread::scope(|s| {
                let watcher = s.spawn(|| {
                    let (mut max_procs, mut max_current) = (0usize, 0u64);
                    let mut events = String::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        max_procs = max_procs.max(tree(&roots).len());
                        if let Some(d) = &pids_dir {
                            max_current = max_current.max(read_u64(&d.join("pids.current")).unwrap_or(0));
                            if let Ok(t) = std::fs::read_to_string(d.join("pids.events")) {
                                events = t;
                            }
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    (max_procs, max_current, events)
                });
                let o = run(&mut l, RunSpec { timeout: Some(Duration::from_secs(4)), ..RunSpec::new(["/bin/bash", "-c", bomb]) });
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                let (a, b, c) = watcher.join().unwrap();
                (o.outcome, a, b, c)
            });
            assert_eq!(outcome.termination, Termination::TimedOut(Duration::from_secs(4)), "{bomb}");
            assert!(max_procs <= 64 + 1, "{bomb}: {max_procs} host processes");
            if kind == BackendKind::Bwrap {
                assert!((32..=64).contains(&max_current), "{bomb}: pids.current peaked at {max_current}");
                let failed: u64 = events.lines().find_map(|l| l.strip_prefix("max ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
                assert!(failed > 0, "{bomb}: the pids limit never refused a fork ({events:?})");
            }
            // The bomb is gone; the host and other leases are fine.
            assert!(wait_until(Duration::from_secs(5), || procs_of_uid(l.host_uid()).is_empty()), "{bomb}: processes survived");
            host_and_neighbours_work(kind);
            assert!(witness.alive());
        }
        assert_eq!(sh(&mut l, "echo recovered").stdout, "recovered\n");
    };

    // ---- K6 -------------------------------------------------------------
    attack_k6_memory_bomb_is_stopped_by_the_memory_limit => |kind| {
        let e = engine(kind);
        let mut p = policy(kind);
        p.limits.memory = ByteSize::mib(64);
        let mut l = e.lease(p, LeaseOptions::default()).unwrap();
        let mut witness = Witness::start();
        let swap_before = swap_used_kib();
        let grow = "a = []\nwhile True: a.append(b'\\x01' * (8 << 20))";
        let bombs: [(&str, Vec<&str>); 4] = [
            ("one process", vec!["python3", "-c", grow]),
            ("tmpfs pages", vec!["python3", "-c", "f = open('/tmp/fill', 'wb')\nwhile True: f.write(b'\\x01' * (1 << 20)); f.flush()"]),
            ("shared memory", vec!["python3", "-c", "import mmap\nm = mmap.mmap(-1, 1 << 30, flags=mmap.MAP_SHARED)\nfor i in range(0, 1 << 30, 4096): m[i] = 1"]),
            // Behind a shell, the shell reports its child's SIGKILL as status 137.
            ("behind a shell", vec!["/bin/sh", "-c", "python3 -c \"$0\"; echo \"status $?\"; exit 137", grow]),
        ];
        for (what, bomb) in bombs {
            l.start().unwrap();
            let mem_dir = cgroup_of(&l, "memory");
            let stop = std::sync::atomic::AtomicBool::new(false);
            let (o, max_usage) = std::thread::scope(|s| {
                let watcher = s.spawn(|| {
                    let mut max = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        if let Some(d) = &mem_dir {
                            for f in ["memory.max_usage_in_bytes", "memory.peak", "memory.usage_in_bytes", "memory.current"] {
                                max = max.max(read_u64(&d.join(f)).unwrap_or(0));
                            }
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    max
                });
                let o = run(&mut l, RunSpec::new(bomb.clone()));
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                (o, watcher.join().unwrap())
            });
            // Behind a shell, bwrap's kernel kills only the bomb and the shell
            // goes on (its echo may appear); gVisor's sentry dies whole. Either
            // way moat reports the memory limit and kills the whole tree.
            if what == "behind a shell" {
                assert!(o.stdout == "status 137\n" || o.stdout.is_empty(), "{what}: {}", o.stdout);
            }
            assert_eq!(o.outcome.termination, Termination::MemoryLimit(ByteSize::mib(64)), "{what}: {:?} {}", o.outcome, o.stderr);
            assert_eq!(o.outcome.reason().unwrap(), "moat: memory limit 64 MiB reached, process tree killed");
            assert_eq!(o.code(), 137);
            if kind == BackendKind::Bwrap {
                assert!(max_usage > 32 << 20 && max_usage <= 64 << 20, "{what}: usage peaked at {max_usage}");
            }
            l.stop();
            assert!(wait_until(Duration::from_secs(5), || procs_of_uid(l.host_uid()).is_empty()), "{what}: processes survived");
            assert!(witness.alive(), "{what}: a host process died");
            // Free the tmpfs pages the second bomb left behind.
            l.reset().unwrap();
        }
        // Several processes that together exceed the limit: the kernel kills
        // them, the parent sees SIGKILL statuses, nothing exceeds the limit.
        let o = py(&mut l, r##"
import os, time
kids = []
for i in range(12):
    p = os.fork()
    if p == 0:
        x = b"\x01" * (16 << 20)
        time.sleep(3)
        os._exit(0)
    kids.append(p)
st = [os.waitpid(k, 0)[1] for k in kids]
print("killed", sum(1 for s in st if os.WIFSIGNALED(s) and os.WTERMSIG(s) == 9))
print("other", sum(1 for s in st if not (os.WIFSIGNALED(s) and os.WTERMSIG(s) == 9) and s != 0))
"##);
        let got = pairs(&o.stdout);
        match o.outcome.termination {
            Termination::Exited(0) => {
                let killed: u32 = got["killed"].parse().unwrap();
                assert!(killed >= 8, "only {killed} of 12 children were stopped: {}", o.stdout);
                assert_eq!(got["other"], "0");
            }
            Termination::MemoryLimit(_) => {}
            ref t => panic!("unexpected {t:?}: {}", o.stderr),
        }
        assert!(witness.alive());
        assert!(swap_used_kib() <= swap_before + 1024, "the host swapped");
        host_and_neighbours_work(kind);
        assert_eq!(sh(&mut l, "echo recovered").stdout, "recovered\n");
    };

    // ---- K7 -------------------------------------------------------------
    attack_k7_cpu_hog_is_bounded_by_the_cpu_limit => |kind| {
        let e = engine(kind);
        let mut p = policy(kind);
        p.limits.millicpus = 200;
        let mut l = e.lease(p, LeaseOptions::default()).unwrap();
        l.start().unwrap();
        let cpu_dir = cgroup_of(&l, "cpu").expect("the lease has no host cgroup");
        // CPU time of everything in the lease's cgroup: bwrap and the
        // commands, or runsc, its gofer, the sentry and its stubs.
        let members_ticks = || -> u64 {
            std::fs::read_to_string(cpu_dir.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| proc_info(l.parse().ok()?))
                .map(|p| p.cpu_ticks)
                .sum()
        };
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        // Two busy loops: without the limit they would use both CPUs.
        let (o, (used, throttled)) = std::thread::scope(|s| {
            let measure = s.spawn(|| {
                std::thread::sleep(Duration::from_millis(800));
                let t0 = Instant::now();
                let c0 = members_ticks();
                std::thread::sleep(Duration::from_secs(2));
                let c1 = members_ticks();
                let throttled = std::fs::read_to_string(cpu_dir.join("cpu.stat"))
                    .unwrap_or_default()
                    .lines()
                    .find_map(|l| l.strip_prefix("nr_throttled "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0);
                ((c1.saturating_sub(c0)) as f64 / hz / t0.elapsed().as_secs_f64(), throttled)
            });
            let o = run(&mut l, RunSpec { timeout: Some(Duration::from_secs(4)), ..RunSpec::new(["/bin/sh", "-c", "while :; do :; done & while :; do :; done"]) });
            (o, measure.join().unwrap())
        });
        assert_eq!(o.outcome.termination, Termination::TimedOut(Duration::from_secs(4)));
        assert!(used < 0.35, "the hog used {used:.2} CPUs with a 0.2 CPU limit");
        assert!(used > 0.05, "the hog did not run ({used:.2} CPUs): the measurement proves nothing");
        assert!(throttled > 0, "the cgroup was never throttled");
        // The group is gone after the timeout.
        assert!(!cpu_dir.exists());
        assert!(wait_until(Duration::from_secs(5), || procs_of_uid(l.host_uid()).is_empty()));
    };

    attack_k7_timeout_kills_double_forked_setsid_and_nohup_children => |kind| {
        let (e, mut l) = lease(kind);
        let m = token("k7");
        let script = format!(r##"
setsid python3 -c 'import time; time.sleep(600)' {m}-setsid &
nohup sh -c 'trap "" HUP TERM INT; exec python3 -c "import time; time.sleep(600)" {m}-nohup' >/dev/null 2>&1 &
( ( exec python3 -c 'import os, time; os.setsid(); time.sleep(600)' {m}-double & ) & )
python3 -c 'import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        import signal
        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT): signal.signal(s, signal.SIG_IGN)
        time.sleep(600)
    os._exit(0)
' {m}-daemon
python3 -c 'while True: pass' {m}-busy &
exec sleep 600
"##);
        l.start().unwrap();
        let roots = l.host_pids();
        let o = run(&mut l, RunSpec { timeout: Some(Duration::from_secs(3)), ..RunSpec::new(["/bin/sh", "-c", &script]) });
        assert_eq!(o.outcome.termination, Termination::TimedOut(Duration::from_secs(3)), "{}", o.stderr);
        assert_eq!(o.code(), 124);
        let survivors = || -> Vec<String> {
            all_procs().into_iter().filter(|p| p.cmdline.contains(&m) || (p.uids.contains(&l.host_uid()))).map(|p| format!("{} {}", p.pid, p.cmdline)).collect()
        };
        let mut left = Vec::new();
        let clean = wait_until(Duration::from_secs(3), || { left = survivors(); left.is_empty() });
        assert!(clean, "survivors: {left:?}");
        assert!(tree(&roots).is_empty(), "the instance's supervisor survived");
        let ids = LeaseIds::of(&e, &l);
        assert!(cgroup_dirs_with(&ids.id).is_empty());
        // The lease works again afterwards, with a fresh instance.
        assert_eq!(sh(&mut l, "echo again").stdout, "again\n");
    };

    // ---- K8 -------------------------------------------------------------
    attack_k8_nothing_survives_destroy => |kind| {
        let e = engine(kind);
        let mut l = e.lease(policy(kind), LeaseOptions::default()).unwrap();
        let m = token("k8-destroy");
        let o = sh(&mut l, &format!("setsid python3 -c 'import time; time.sleep(600)' {m} >/dev/null 2>&1 & nohup sleep 600 >/dev/null 2>&1 & echo x > /workspace/f; echo ok"));
        assert_eq!(o.stdout, "ok\n");
        let ids = LeaseIds::of(&e, &l);
        assert!(!mounts_with(&ids.id).is_empty(), "the lease's storage is not mounted");
        if kind == BackendKind::Bwrap {
            assert!(!cgroup_dirs_with(&ids.id).is_empty());
            assert!(wait_until(Duration::from_secs(5), || !procs_with(&m).is_empty()));
        }
        l.destroy().unwrap();
        ids.assert_gone();
        assert!(procs_with(&m).is_empty());
    };

    attack_k8_nothing_survives_a_killed_sandbox => |kind| {
        let e = engine(kind);
        // The supervisor killed while a command runs: the run reports it.
        let mut l = e.lease(policy(kind), LeaseOptions::default()).unwrap();
        l.start().unwrap();
        let pids_dir = cgroup_of(&l, "pids").expect("the lease has no host cgroup");
        let ws = l.workspace_dir();
        let uid = l.host_uid();
        let m = token("k8-crash");
        let (o, members) = std::thread::scope(|s| {
            let killer = s.spawn(|| {
                assert!(wait_until(Duration::from_secs(30), || ws.join("ready").exists()), "the command did not start");
                // The supervisor: the member of the lease's cgroup whose parent
                // is not one (bwrap, or `runsc run`).
                let members: Vec<Proc> = std::fs::read_to_string(pids_dir.join("cgroup.procs"))
                    .unwrap()
                    .lines()
                    .filter_map(|l| proc_info(l.parse().ok()?))
                    .collect();
                let tops: Vec<u32> = members.iter().filter(|p| !members.iter().any(|q| q.pid == p.ppid)).map(|p| p.pid).collect();
                assert_eq!(tops.len(), 1, "{members:?}");
                // SAFETY: kill(2) on the lease's own supervisor.
                unsafe { libc::kill(tops[0] as i32, libc::SIGKILL) };
                members
            });
            let o = run(&mut l, RunSpec { timeout: Some(Duration::from_secs(30)), ..RunSpec::new(["/bin/sh", "-c", &format!("setsid sleep 600 & python3 -c 'import time; open(\"/workspace/ready\", \"w\"); time.sleep(600)' {m}")]) });
            (o, killer.join().unwrap())
        });
        assert_eq!(o.outcome.termination, Termination::SandboxDied, "{:?}", o.outcome);
        assert_eq!(o.code(), 137);
        assert!(members.len() >= 3, "{members:?}");
        let mut left = Vec::new();
        let gone = wait_until(Duration::from_secs(5), || {
            left = members.iter().filter_map(|p| proc_info(p.pid)).filter(|p| !p.zombie).map(|p| p.cmdline).chain(procs_of_uid(uid).into_iter().map(|p| p.cmdline)).collect();
            left.is_empty()
        });
        assert!(gone, "processes survived their supervisor: {left:?}");

        // Killed between commands, with daemons running: they die with it, on
        // their own, before moat does anything.
        assert_eq!(sh(&mut l, &format!("setsid python3 -c 'import time; time.sleep(600)' {m}-2 >/dev/null 2>&1 & echo ok")).stdout, "ok\n");
        assert!(wait_until(Duration::from_secs(5), || !procs_with(&format!("{m}-2")).is_empty()) || kind != BackendKind::Bwrap);
        for p in l.host_pids() {
            // SAFETY: as above.
            unsafe { libc::kill(p as i32, libc::SIGKILL) };
        }
        let mut left = Vec::new();
        let gone = wait_until(Duration::from_secs(5), || {
            left = procs_of_uid(uid).into_iter().chain(procs_with(&format!("{m}-2"))).map(|p| p.cmdline).collect();
            left.is_empty()
        });
        assert!(gone, "processes outlived their sandbox: {left:?}");

        // The same when the namespace's first process (moat-init) is killed.
        if kind == BackendKind::Bwrap {
            assert_eq!(sh(&mut l, "setsid sleep 600 >/dev/null 2>&1 & echo ok").stdout, "ok\n");
            let init: Vec<u32> = tree(&l.host_pids()).iter().filter(|p| p.cmdline.starts_with("/run/moat/init")).map(|p| p.pid).collect();
            assert_eq!(init.len(), 1, "{:?}", tree(&l.host_pids()));
            // SAFETY: kill(2) on the lease's own init.
            unsafe { libc::kill(init[0] as i32, libc::SIGKILL) };
            assert!(wait_until(Duration::from_secs(5), || procs_of_uid(uid).is_empty()), "processes outlived their init");
        }
        // The lease recovers with a fresh instance; destroying it leaves nothing.
        assert_eq!(sh(&mut l, "echo recovered").stdout, "recovered\n");
        let ids = LeaseIds::of(&e, &l);
        l.destroy().unwrap();
        ids.assert_gone();
    };

    attack_k8_nothing_survives_a_killed_moat => |kind: BackendKind| {
        // The process holding the lease (moat) is SIGKILLed: it cleans up
        // nothing. Its sandbox must die with it, and the next engine start on
        // the same data directory must remove files, mount and cgroups.
        let dir = scratch_dir("k8-moat");
        let data = dir.0.join("data");
        let ids_file = dir.0.join("ids");
        let marker = token("k8-moat");
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["k8_crash_child", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env("MOAT_K8_CHILD", &ids_file)
            .env("MOAT_K8_KIND", kind.name())
            .env("MOAT_K8_DATA", &data)
            .env("MOAT_K8_RUN", config().runtime_dir)
            .env("MOAT_K8_MARKER", &marker)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let ready = wait_until(Duration::from_secs(30), || {
            ids_file.exists() || child.try_wait().unwrap().is_some()
        });
        if !ready || !ids_file.exists() {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("the lease holder did not start its sandbox: {}", String::from_utf8_lossy(&out.stderr));
        }
        let text = std::fs::read_to_string(&ids_file).unwrap();
        let (id, uid) = text.trim().split_once(' ').unwrap();
        let ids = LeaseIds { id: id.to_string(), uid: uid.parse().unwrap(), dir: moat_sandbox::leases_dir(&moat_sandbox::EngineConfig { data_dir: data.clone(), ..config() }).join(id) };
        if kind == BackendKind::Bwrap {
            assert!(wait_until(Duration::from_secs(5), || !procs_with(&marker).is_empty()));
        }
        assert!(!mounts_with(&ids.id).is_empty());
        child.kill().unwrap();
        child.wait().unwrap();
        let mut left = Vec::new();
        let gone = wait_until(Duration::from_secs(5), || {
            left = procs_of_uid(ids.uid).into_iter().chain(procs_with(&marker)).chain(procs_with(&ids.id)).map(|p| p.cmdline).collect();
            left.is_empty()
        });
        assert!(gone, "sandbox processes outlived moat: {left:?}");
        let _next = moat_sandbox::Engine::new(moat_sandbox::EngineConfig { data_dir: data.clone(), ..config() }, kind).unwrap();
        ids.assert_gone();
    };

    attack_k8_nothing_survives_a_dropped_lease => |kind| {
        let e = engine(kind);
        let mut l = e.lease(policy(kind), LeaseOptions::default()).unwrap();
        assert_eq!(sh(&mut l, "setsid sleep 600 >/dev/null 2>&1 & echo ok").stdout, "ok\n");
        let ids = LeaseIds::of(&e, &l);
        drop(l);
        ids.assert_gone();

        // A named lease keeps its files (its storage stays mounted), but no
        // process or cgroup; destroying it later removes the rest.
        let name = token("k8-named");
        let mut l = e.lease(policy(kind), LeaseOptions { name: Some(name.clone()), ..Default::default() }).unwrap();
        assert_eq!(sh(&mut l, "echo kept > f; setsid sleep 600 >/dev/null 2>&1 & echo ok").stdout, "ok\n");
        let ids = LeaseIds::of(&e, &l);
        drop(l);
        assert!(wait_until(Duration::from_secs(5), || procs_of_uid(ids.uid).is_empty()));
        assert!(cgroup_dirs_with(&ids.id).is_empty());
        let mut l = e.lease(policy(kind), LeaseOptions { name: Some(name.clone()), ..Default::default() }).unwrap();
        assert_eq!(sh(&mut l, "cat f").stdout, "kept\n");
        l.destroy().unwrap();
        ids.assert_gone();
    };
}

/// Not a test of its own: the lease holder that
/// `attack_k8_nothing_survives_a_killed_moat` starts and then SIGKILLs.
#[test]
#[ignore]
fn k8_crash_child() {
    let Some(ids_file) = std::env::var_os("MOAT_K8_CHILD") else {
        return;
    };
    let var = |k: &str| std::env::var(k).unwrap();
    let kind = BackendKind::parse(&var("MOAT_K8_KIND")).unwrap();
    let e = moat_sandbox::Engine::new(
        moat_sandbox::EngineConfig {
            data_dir: var("MOAT_K8_DATA").into(),
            runtime_dir: var("MOAT_K8_RUN").into(),
            init_path: PathBuf::from(env!("CARGO_BIN_EXE_moat-init")),
        },
        kind,
    )
    .unwrap();
    let mut l = e.lease(policy(kind), LeaseOptions::default()).unwrap();
    let o = sh(
        &mut l,
        &format!(
            "setsid python3 -c 'import time; time.sleep(600)' {} >/dev/null 2>&1 & echo x > /workspace/f; echo ok",
            var("MOAT_K8_MARKER")
        ),
    );
    assert_eq!(o.stdout, "ok\n", "{}", o.stderr);
    let tmp = PathBuf::from(&ids_file).with_extension("tmp");
    std::fs::write(&tmp, format!("{} {}", l.id(), l.host_uid())).unwrap();
    std::fs::rename(&tmp, &ids_file).unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

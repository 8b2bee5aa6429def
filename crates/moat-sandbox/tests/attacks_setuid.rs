//! F8 (setuid/setgid part): a sandbox with a host workspace cannot leave a
//! setuid or setgid file or directory in it, which would run as the
//! workspace's owner for any local user. Every system call that sets the bits
//! is refused inside (EPERM; openat2, whose mode seccomp cannot read, is ENOSYS),
//! the host directory holds no such bit afterwards, ordinary modes still work,
//! and the workspace is mounted nosuid inside.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::host::*;
use common::*;
use moat_policy::BackendKind;
use moat_sandbox::{LeaseOptions, RunSpec, WorkspaceSource};

/// The workspace's owner on the host: an unprivileged uid, as a user's checkout.
const OWNER: &str = "4343:4343";

/// Python helpers shared by the scripts: `show` runs a call and prints its
/// errno name (or OK); `sc` makes a raw system call.
const PRELUDE: &str = r##"
import ctypes, errno, os, stat, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def show(name, f):
    try:
        f()
        print(name, "OK", flush=True)
    except OSError as ex:
        print(name, errno.errorcode.get(ex.errno, str(ex.errno)), flush=True)
def sc(name, nr, *a):
    r = libc.syscall(nr, *a)
    print(name, "OK" if r >= 0 else errno.errorcode.get(ctypes.get_errno()), flush=True)
    if r >= 0 and nr in (2, 85, 257):
        os.close(r)
    return r
def mode(p):
    return oct(os.stat(p).st_mode & 0o7777)
def touch(p, m=0o755):
    os.close(os.open(p, os.O_CREAT | os.O_WRONLY, m))
    os.chmod(p, m)
"##;

/// A host workspace owned by `OWNER` (then `prepare`d), one command run in it
/// (python3 with the prelude and `script`), and the directory for checks after
/// the lease is gone.
fn run_in_host_workspace(
    kind: BackendKind,
    label: &str,
    script: &str,
    prepare: impl FnOnce(&Path),
) -> (Output, OwnedDir) {
    let ws = scratch_dir(label);
    std::fs::write(ws.0.join("existing"), "#!/bin/sh\necho hi\n").unwrap();
    let chown = std::process::Command::new("chown")
        .args(["-R", OWNER])
        .arg(&ws.0)
        .status()
        .unwrap();
    assert!(chown.success());
    prepare(&ws.0);
    let snap = HostSnapshot::take(&[]);
    let e = engine(kind);
    let mut l = e
        .lease(
            policy(kind),
            LeaseOptions {
                run_as: None,
                workspace: WorkspaceSource::Host(ws.0.clone()),
                ..Default::default()
            },
        )
        .unwrap();
    let code = format!("{PRELUDE}\n{script}");
    let o = run(&mut l, RunSpec::new(["/usr/bin/python3", "-c", &code]));
    assert_eq!(o.code(), 0, "{}\n{}", o.stdout, o.stderr);
    l.destroy().unwrap();
    snap.assert_unchanged();
    (o, ws)
}

/// Every path under `dir` (itself included) whose mode has S_ISUID or S_ISGID.
fn set_id_paths(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(p) = todo.pop() {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if m.mode() & 0o6000 != 0 {
            out.push((p.clone(), m.mode()));
        }
        if m.is_dir() {
            for e in std::fs::read_dir(&p).unwrap().flatten() {
                todo.push(e.path());
            }
        }
    }
    out
}

fn assert_no_set_id(dir: &Path) {
    let found = set_id_paths(dir);
    assert!(
        found.is_empty(),
        "setuid/setgid left on the host: {found:?}"
    );
}

fn host_mode(dir: &Path, name: &str) -> u32 {
    std::fs::symlink_metadata(dir.join(name)).unwrap().mode() & 0o7777
}

per_backend! {
    attack_f8_setuid_chmod_family_is_refused => |kind| {
        let script = r##"
import subprocess
touch("f")
for name, args in [("chmod_u+s", ["chmod", "u+s", "f"]), ("chmod_g+s", ["chmod", "g+s", "f"]),
                   ("chmod_4755", ["chmod", "4755", "f"]), ("chmod_6755_existing", ["chmod", "6755", "existing"])]:
    r = subprocess.run(args, capture_output=True, text=True)
    print(name, "EPERM" if r.returncode != 0 and "Operation not permitted" in r.stderr else "rc=%d" % r.returncode, flush=True)
show("os_chmod_4755", lambda: os.chmod("f", 0o4755))
show("os_chmod_2755", lambda: os.chmod("f", 0o2755))
def fchmod():
    fd = os.open("f", os.O_RDONLY)
    try:
        os.fchmod(fd, 0o4755)
    finally:
        os.close(fd)
show("os_fchmod_4755", fchmod)
dfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
show("os_chmod_dir_fd_6755", lambda: os.chmod("f", 0o6755, dir_fd=dfd))
sc("chmod", 90, b"f", 0o4755)
sc("fchmodat", 268, -100, b"f", 0o2755)
sc("fchmodat2", 452, -100, b"f", 0o4755, 0)
fd = os.open("f", os.O_RDONLY)
sc("fchmod", 91, fd, 0o6755)
# chmod after create: a new file, then the bit.
touch("later", 0o644)
show("chmod_after_create", lambda: os.chmod("later", 0o4755))
print("mode_f", mode("f"), flush=True)
# Copying a setuid program: cp -p drops the bits itself; shutil.copy2 tries to
# keep them and is refused.
r = subprocess.run(["cp", "-p", "/usr/bin/passwd", "cp-p"], capture_output=True, text=True)
print("cp_p", "rc=%d" % r.returncode, mode("cp-p"), flush=True)
import shutil
show("shutil_copy2", lambda: shutil.copy2("/usr/bin/passwd", "copy2"))
"##;
        let (o, ws) = run_in_host_workspace(kind, "f8-chmod", script, |_| {});
        expect_all(&o, &[
            ("chmod_u+s", "EPERM"), ("chmod_g+s", "EPERM"), ("chmod_4755", "EPERM"), ("chmod_6755_existing", "EPERM"),
            ("os_chmod_4755", "EPERM"), ("os_chmod_2755", "EPERM"), ("os_fchmod_4755", "EPERM"),
            ("os_chmod_dir_fd_6755", "EPERM"),
            ("chmod", "EPERM"), ("fchmodat", "EPERM"), ("fchmod", "EPERM"),
            // gVisor's sentry (this runsc) has no fchmodat2 at all.
            ("fchmodat2", if kind == BackendKind::Bwrap { "EPERM" } else { "EPERM|ENOSYS" }),
            ("chmod_after_create", "EPERM"),
            ("mode_f", "0o755"),
            ("cp_p", "rc=0 0o755"),
            ("shutil_copy2", "EPERM"),
        ]);
        assert_no_set_id(&ws.0);
        assert_eq!(host_mode(&ws.0, "f"), 0o755);
        assert_eq!(host_mode(&ws.0, "later"), 0o644);
    };

    attack_f8_setuid_creating_a_file_with_the_bit_is_refused => |kind| {
        let script = r##"
show("os_open_creat_4755", lambda: os.close(os.open("o1", os.O_CREAT | os.O_WRONLY, 0o4755)))
show("os_open_creat_excl_2755", lambda: os.close(os.open("o2", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o2755)))
sc("open", 2, b"o3", os.O_CREAT | os.O_WRONLY, 0o6755)
sc("openat", 257, -100, b"o4", os.O_CREAT | os.O_RDWR, 0o4755)
sc("creat", 85, b"o5", 0o4755)
# An unnamed file given a name afterwards.
def tmpfile():
    fd = os.open(".", os.O_TMPFILE | os.O_WRONLY, 0o4755)
    try:
        os.link("/proc/self/fd/%d" % fd, "o6", follow_symlinks=True)
    finally:
        os.close(fd)
show("o_tmpfile_4755", tmpfile)
show("os_mknod_4755", lambda: os.mknod("m1", stat.S_IFREG | 0o4755))
sc("mknod", 133, b"m2", stat.S_IFREG | 0o2755, 0)
sc("mknodat", 259, -100, b"m3", stat.S_IFREG | 0o6755, 0)
# openat2 carries the mode in a struct the filter cannot read.
how = (ctypes.c_uint64 * 3)(os.O_CREAT | os.O_WRONLY, 0o4755, 0)
sc("openat2", 437, -100, b"o7", how, 24)
# Controls: the same calls with ordinary modes work.
show("control_open_creat_755", lambda: os.close(os.open("c1", os.O_CREAT | os.O_WRONLY, 0o755)))
show("control_mknod_644", lambda: os.mknod("c2", stat.S_IFREG | 0o644))
# Without O_CREAT the mode argument is not judged (it may hold anything).
sc("control_openat_no_creat", 257, -100, b"c1", os.O_RDONLY, 0o4755)
print("created", sorted(n for n in os.listdir(".") if n[0] in "om"), flush=True)
"##;
        let (o, ws) = run_in_host_workspace(kind, "f8-create", script, |_| {});
        let expected = vec![
            ("os_open_creat_4755", "EPERM"), ("os_open_creat_excl_2755", "EPERM"),
            ("open", "EPERM"), ("openat", "EPERM"), ("creat", "EPERM"), ("o_tmpfile_4755", "EPERM"),
            ("os_mknod_4755", "EPERM"), ("mknod", "EPERM"), ("mknodat", "EPERM"),
            ("openat2", "ENOSYS"),
            ("control_open_creat_755", "OK"), ("control_mknod_644", "OK"), ("control_openat_no_creat", "OK"),
            ("created", "[]"),
        ];
        expect_all(&o, &expected);
        assert_no_set_id(&ws.0);
        assert_eq!(host_mode(&ws.0, "c1") & 0o6000, 0);
    };

    attack_f8_setuid_setgid_directories_are_refused => |kind| {
        let script = r##"
import subprocess
os.mkdir("d1")
r = subprocess.run(["chmod", "g+s", "d1"], capture_output=True, text=True)
print("chmod_g+s_dir", "EPERM" if "Operation not permitted" in r.stderr else "rc=%d" % r.returncode, flush=True)
show("os_chmod_dir_2775", lambda: os.chmod("d1", 0o2775))
r = subprocess.run(["mkdir", "-m", "2775", "d2"], capture_output=True, text=True)
print("mkdir_m_2775", "EPERM" if "Operation not permitted" in r.stderr else "rc=%d" % r.returncode, flush=True)
# mkdir itself drops S_ISGID (the kernel's rule): no error, no bit.
os.mkdir("d3", 0o2775)
print("mkdir_mode_d3", mode("d3"), flush=True)
os.makedirs("d1/deep/er")
show("deep_dir_2755", lambda: os.chmod("d1/deep/er", 0o2755))
show("deep_file_4755", lambda: touch("d1/deep/er/x", 0o4755))
print("mode_d1", mode("d1"), flush=True)
"##;
        let (o, ws) = run_in_host_workspace(kind, "f8-dirs", script, |_| {});
        expect_all(&o, &[
            ("chmod_g+s_dir", "EPERM"), ("os_chmod_dir_2775", "EPERM"), ("mkdir_m_2775", "EPERM"),
            ("mkdir_mode_d3", "0o755"), ("deep_dir_2755", "EPERM"), ("deep_file_4755", "EPERM"),
            ("mode_d1", "0o755"),
        ]);
        assert_no_set_id(&ws.0);
    };

    attack_f8_setuid_ordinary_modes_still_work => |kind| {
        let script = r##"
import subprocess
touch("s.sh", 0o644)
with open("s.sh", "w") as f:
    f.write("#!/bin/sh\necho ran\n")
for name, args in [("chmod_+x", ["chmod", "+x", "s.sh"]), ("chmod_0600", ["chmod", "0600", "existing"]),
                   ("chmod_0755", ["chmod", "0755", "existing"]), ("chmod_u+rwx,go-w", ["chmod", "u+rwx,go-w", "existing"])]:
    r = subprocess.run(args, capture_output=True, text=True)
    print(name, "OK" if r.returncode == 0 else r.stderr.strip(), flush=True)
print("run_script", subprocess.run(["./s.sh"], capture_output=True, text=True).stdout.strip(), flush=True)
show("os_chmod_0700", lambda: os.chmod("s.sh", 0o700))
fd = os.open("s.sh", os.O_RDONLY)
show("os_fchmod_0750", lambda: os.fchmod(fd, 0o750))
os.mkdir("shared")
show("sticky_dir_1777", lambda: os.chmod("shared", 0o1777))
print("mode_s", mode("s.sh"), flush=True)
print("mode_existing", mode("existing"), flush=True)
print("mode_shared", mode("shared"), flush=True)
"##;
        let (o, ws) = run_in_host_workspace(kind, "f8-ordinary", script, |_| {});
        expect_all(&o, &[
            ("chmod_+x", "OK"), ("chmod_0600", "OK"), ("chmod_0755", "OK"), ("chmod_u+rwx,go-w", "OK"),
            ("run_script", "ran"), ("os_chmod_0700", "OK"), ("os_fchmod_0750", "OK"), ("sticky_dir_1777", "OK"),
            ("mode_s", "0o750"), ("mode_existing", "0o755"), ("mode_shared", "0o1777"),
        ]);
        assert_eq!(host_mode(&ws.0, "s.sh"), 0o750);
        assert_eq!(host_mode(&ws.0, "existing"), 0o755);
        assert_eq!(host_mode(&ws.0, "shared"), 0o1777);
    };

    attack_f8_setuid_writable_mounts_are_nosuid_inside => |kind| {
        let script = r##"
want = {"/workspace", "/home/agent", "/tmp", "/dev/shm"}
for line in open("/proc/self/mountinfo"):
    f = line.split()
    if f[4] in want:
        print("nosuid_" + f[4], "yes" if "nosuid" in f[5].split(",") else "no:" + f[5], flush=True)
import subprocess
r = subprocess.run(["./planted-id", "-u"], capture_output=True, text=True)
print("planted_euid", r.stdout.strip() or r.stderr.strip(), flush=True)
"##;
        // A setuid-root program that reached the workspace some other way
        // (planted on the host): inside it runs as the sandbox's user.
        let plant = |ws: &Path| {
            std::fs::copy("/usr/bin/id", ws.join("planted-id")).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(ws.join("planted-id"), std::fs::Permissions::from_mode(0o4755)).unwrap();
        };
        let (o, ws) = run_in_host_workspace(kind, "f8-nosuid", script, plant);
        let mounts = if kind == BackendKind::Bwrap {
            // bwrap binds every place nosuid (and nodev).
            "yes"
        } else {
            // moat asks runsc for nosuid binds too (gvisor.rs), but this runsc
            // shows only rw/ro; setuid is moot in its kernel under
            // noNewPrivileges, which planted_euid shows.
            "no:rw"
        };
        expect_all(&o, &[
            ("nosuid_/workspace", mounts), ("nosuid_/home/agent", mounts), ("nosuid_/tmp", mounts), ("nosuid_/dev/shm", mounts),
            ("planted_euid", "1000"),
        ]);
        drop(ws);
    };
}

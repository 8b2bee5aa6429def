//! docs/threat-model.md R1: with `root_inside` (an image, uid 0 inside the
//! sandbox's user namespace, a writable system layer of the lease's own),
//! the kernel (K) and file system (F) cases still hold: the K4 probe answers
//! as for an unprivileged sandbox, block-device mounts, new namespaces,
//! module loading and setuid escalation are refused, the host sees only the
//! lease's unprivileged uid, the image and the host's files are unchanged,
//! other leases stay out of reach, and the layer vanishes at a reset.
//! bwrap only: the gVisor backend refuses `root_inside` for now.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::host::*;
use common::kernel::{k4_expected, SYSCALLS_PY};
use common::*;
use moat_policy::BackendKind;
use moat_sandbox::{image, Engine, Lease, LeaseOptions, RunSpec};

const IMAGE: &str = "r1-python";

/// The test image (with Python, for the probes), imported once per binary.
fn image_root() -> &'static PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let src = scratch().join("r1-src");
        let _ = std::fs::remove_dir_all(&src);
        rootfs::make_with_python(&src);
        let c = config();
        let root = image::import(&c.data_dir, &c.runtime_dir, IMAGE, &src)
            .expect("import")
            .root;
        let _ = std::fs::remove_dir_all(&src);
        root
    })
}

/// Every entry of the image with its fingerprint and owner.
type Entry = (PathBuf, Option<(Vec<u8>, u32, u64)>, u32);

fn image_snapshot() -> Vec<Entry> {
    let mut out = Vec::new();
    let mut todo = vec![image_root().clone()];
    while let Some(p) = todo.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        if m.is_dir() {
            todo.extend(std::fs::read_dir(&p).unwrap().flatten().map(|e| e.path()));
        }
        out.push((p.clone(), fingerprint(&p), m.uid()));
    }
    out.sort();
    out
}

fn root_lease() -> (Engine, Lease) {
    image_root();
    let e = engine(BackendKind::Bwrap);
    let mut p = policy(BackendKind::Bwrap);
    p.image = Some(IMAGE.into());
    p.root_inside = true;
    let l = e
        .lease(p, LeaseOptions::default())
        .expect("a root-inside lease");
    (e, l)
}

fn available() -> bool {
    backend_available(BackendKind::Bwrap)
}

#[test]
fn attack_r1_root_inside_is_the_leases_uid_outside_and_writes_stay_in_its_layer() {
    if !available() {
        return;
    }
    let before = image_snapshot();
    let (_e, mut l) = root_lease();
    let uid = l.host_uid();
    assert_ne!(uid, 0);
    let marker = token("r1-uid");
    let o = sh(
        &mut l,
        &format!(
            "id -u; cat /proc/self/uid_map; echo new > /usr/bin/newtool && echo wrote-usr; \
             echo conf > /etc/newconf && echo wrote-etc; mkdir -p /usr/local/x && echo wrote-local; \
             ls -ln /usr/bin/newtool; python3 -c 'import time; time.sleep(30)' {marker} & sleep 0.5; echo started"
        ),
    );
    let mut lines = o.stdout.lines();
    assert_eq!(lines.next(), Some("0"), "{o:?}");
    // One id mapped, of size one (bwrap nests a namespace to disable
    // further ones, so the second field is the outer namespace's 0).
    let map: Vec<String> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(
        (map.len(), map.last().map(String::as_str)),
        (3, Some("1")),
        "{o:?}"
    );
    for w in ["wrote-usr", "wrote-etc", "wrote-local", "started"] {
        assert!(o.stdout.contains(w), "{w}: {o:?}");
    }
    // On the host: the sandbox's processes run as the lease's uid, never 0.
    let procs = procs_with(&marker);
    assert!(!procs.is_empty(), "the marked process was not found");
    for p in &procs {
        assert_eq!(p.uids, [uid; 4], "{p:?}");
        // Its capabilities (CHOWN, DAC_OVERRIDE, FOWNER, KILL, SETGID,
        // SETUID) hold in a user namespace of its own, never the host's.
        assert_eq!(p.cap_eff & !0xeb, 0, "{p:?}");
        assert!(p.no_new_privs, "{p:?}");
        let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/user")).unwrap();
        assert_ne!(ns(&p.pid.to_string()), ns("self"), "{p:?}");
    }
    // The writes are in the lease's layer, owned by its uid; the image is as it was.
    let upper = l.storage_dir().join(".system/upper");
    let m = std::fs::symlink_metadata(upper.join("usr/bin/newtool")).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o6000), (uid, 0));
    assert!(upper.join("etc/newconf").exists());
    assert_eq!(image_snapshot(), before, "the image changed");
    // A reset (the pool's, between turns) leaves none of it.
    l.reset().unwrap();
    let o = sh(
        &mut l,
        "cat /usr/bin/newtool /etc/newconf 2>&1; ls /usr/local; id -u",
    );
    assert!(
        o.stdout.contains("No such file") && !o.stdout.contains("new\n"),
        "{o:?}"
    );
    assert!(o.stdout.ends_with("0\n"), "{o:?}");
    assert!(!upper.exists(), "the old layer is still there");
    assert_eq!(image_snapshot(), before, "the image changed");
}

#[test]
fn attack_r1_kernel_cases_still_fail_with_root_inside() {
    if !available() {
        return;
    }
    let (_e, mut l) = root_lease();
    let snap = HostSnapshot::take(&[]);
    let o = run(
        &mut l,
        RunSpec::new(["/usr/bin/python3", "-c", SYSCALLS_PY]),
    );
    expect_all(&o, &k4_expected(BackendKind::Bwrap));
    assert_eq!(o.code(), 0, "{}", o.stderr);
    // Root's own extras: block and character devices, a block-device mount,
    // file handles (the "shocker" escape), raw I/O ports, the kernel's knobs.
    let extra = r##"
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def sc(name, nr, *a):
    args = [ctypes.c_long(x) if isinstance(x, int) else x for x in a]
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), *args)
    print(name, "OK" if r >= 0 else errno.errorcode.get(ctypes.get_errno(), "?"), flush=True)
def tryw(name, path, data=b"1"):
    try:
        with open(path, "wb") as f:
            f.write(data)
        print(name, "OK", flush=True)
    except OSError as e:
        print(name, errno.errorcode.get(e.errno, "?"), flush=True)
sc("mknod_block", 133, b"/tmp/blk", 0o60600, (8 << 8) | 0)
sc("mknod_char", 133, b"/tmp/chr", 0o20600, (1 << 8) | 3)
sc("mount_block_device", 165, b"/dev/vda", b"/mnt", b"ext4", 0, None)
sc("mount_proc_again", 165, b"proc", b"/mnt", b"proc", 0, None)
handle = ctypes.create_string_buffer(128)
ctypes.memmove(handle, (128).to_bytes(4, "little"), 4)
sc("name_to_handle_at", 303, -100, b"/etc", handle, ctypes.byref(ctypes.c_int()), 0)
sc("open_by_handle_at", 304, os.open("/", os.O_RDONLY), handle, 0)
sc("iopl", 172, 3)
sc("ioperm", 173, 0x80, 1, 1)
sc("setuid_0", 105, 0)
sc("setuid_other", 105, 4242)
sc("chown_usr_to_other", 92, b"/usr/bin/python3", 4242, 4242)
tryw("write_sysrq", "/proc/sysrq-trigger", b"h")
tryw("write_core_pattern", "/proc/sys/kernel/core_pattern", b"|/tmp/x")
tryw("write_sys_uevent", "/sys/kernel/uevent_helper", b"/tmp/x")
tryw("write_modprobe", "/proc/sys/kernel/modprobe", b"/tmp/x")
"##;
    let o = run(&mut l, RunSpec::new(["/usr/bin/python3", "-c", extra]));
    expect_all(
        &o,
        &[
            ("mknod_block", "EPERM"),
            ("mknod_char", "EPERM"),
            ("mount_block_device", "EPERM"),
            ("mount_proc_again", "EPERM"),
            ("name_to_handle_at", "OK|EPERM|EOPNOTSUPP"),
            ("open_by_handle_at", "EPERM"),
            ("iopl", "EPERM"),
            ("ioperm", "EPERM"),
            // uid 0 is itself; no other uid exists in the namespace.
            ("setuid_0", "OK"),
            ("setuid_other", "EINVAL|EPERM"),
            ("chown_usr_to_other", "EINVAL|EPERM"),
            ("write_sysrq", "EACCES|EROFS|ENOENT|EPERM"),
            ("write_core_pattern", "EACCES|EROFS|ENOENT|EPERM"),
            ("write_sys_uevent", "EACCES|EROFS|ENOENT|EPERM"),
            ("write_modprobe", "EACCES|EROFS|ENOENT|EPERM"),
        ],
    );
    // PID 1 (moat-init) survives root's signals; /proc shows the sandbox
    // only; the host's loopback is not the sandbox's (no door: no network).
    let host = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    host.set_nonblocking(true).unwrap();
    let port = host.local_addr().unwrap().port();
    let probe = format!(
        r##"
import os, signal, socket
for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGSTOP):
    try:
        os.kill(1, sig); print("kill_pid1_%d" % sig, "OK", flush=True)
    except OSError as e:
        print("kill_pid1_%d" % sig, e.errno, flush=True)
pids = [p for p in os.listdir("/proc") if p.isdigit()]
print("proc_pids", "few" if len(pids) < 10 else "many:%d" % len(pids), flush=True)
s = socket.socket()
s.settimeout(2)
try:
    s.connect(("127.0.0.1", {port})); print("host_loopback", "OK", flush=True)
except OSError as e:
    print("host_loopback", "refused", flush=True)
"##
    );
    let o = run(
        &mut l,
        RunSpec::new(["/usr/bin/python3", "-c", probe.as_str()]),
    );
    assert!(o.stdout.contains("proc_pids few"), "{o:?}");
    assert!(o.stdout.contains("host_loopback refused"), "{o:?}");
    assert!(
        host.accept().is_err(),
        "the host's listener got a connection from the sandbox"
    );
    let again = sh(&mut l, "echo still-here");
    assert_eq!(again.stdout, "still-here\n", "PID 1 died: {o:?}");
    let o = sh(
        &mut l,
        "unshare -Ur true; echo \"unshare_user=$?\"; unshare -m true; echo \"unshare_mount=$?\"",
    );
    assert_eq!(o.stdout, "unshare_user=1\nunshare_mount=1\n", "{o:?}");
    snap.assert_unchanged();
}

#[test]
fn attack_r1_setuid_files_other_leases_and_host_files_stay_out_of_reach() {
    if !available() {
        return;
    }
    let snap = HostSnapshot::take(&[]);
    // A neighbour with a secret in its workspace.
    let (_e2, mut other) = lease(BackendKind::Bwrap);
    let secret = token("r1-neighbour");
    sh(&mut other, &format!("echo {secret} > /workspace/secret"));
    let neighbour_ws = other.workspace_dir();
    let (_e, mut l) = root_lease();
    let o = sh(
        &mut l,
        &format!(
            "cp /usr/bin/id /usr/bin/rootid; chmod 4755 /usr/bin/rootid 2>&1; chmod u+s /usr/bin/rootid 2>&1; \
             stat -c 'mode=%a' /usr/bin/rootid; /usr/bin/rootid -u; \
             cat {ws}/secret 2>&1; ls {leases} 2>&1; cat /etc/shadow 2>&1 | grep -c '^root:\\$' ; \
             echo pwned > /root/.bashrc 2>&1; echo done",
            ws = neighbour_ws.display(),
            leases = neighbour_ws.parent().unwrap().display(),
        ),
    );
    let all = format!("{}{}", o.stdout, o.stderr);
    assert!(
        all.contains("Operation not permitted"),
        "chmod u+s allowed: {all}"
    );
    assert!(o.stdout.contains("mode=755"), "{all}");
    assert!(
        !all.contains(&secret),
        "read the neighbour's workspace: {all}"
    );
    assert!(o.stdout.contains("done"), "{all}");
    // On the host: no set-id file anywhere in the layer, nothing owned by root
    // that the sandbox made, the neighbour's file and the host's as they were.
    let upper = l.storage_dir().join(".system/upper");
    let mut todo = vec![upper.clone()];
    while let Some(p) = todo.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert_eq!(m.mode() & 0o6000, 0, "{}", p.display());
        if p != upper && !p.starts_with(upper.join("usr")) && !p.starts_with(upper.join("root")) {
            continue;
        }
        if m.is_dir() {
            todo.extend(std::fs::read_dir(&p).unwrap().flatten().map(|e| e.path()));
        } else {
            assert_eq!(m.uid(), l.host_uid(), "{}", p.display());
        }
    }
    assert_eq!(
        std::fs::read_to_string(neighbour_ws.join("secret"))
            .unwrap()
            .trim(),
        secret
    );
    assert!(!Path::new("/usr/bin/rootid").exists());
    snap.assert_unchanged();
}

#[test]
fn root_inside_is_refused_without_an_image_or_on_gvisor() {
    let e = engine(BackendKind::Bwrap);
    let mut p = policy(BackendKind::Bwrap);
    p.root_inside = true;
    let err = e.lease(p, LeaseOptions::default()).err().expect("refused");
    assert!(
        err.to_string().contains("root_inside needs an image"),
        "{err}"
    );
}

#[test]
fn attack_r1_links_left_in_the_layer_never_lead_moat_outside() {
    if !available() {
        return;
    }
    // A world-writable host directory a link could aim moat's mount points at.
    let target = scratch().join(format!("r1-target-{}", token("t")));
    std::fs::create_dir_all(&target).unwrap();
    std::fs::set_permissions(
        &target,
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .unwrap();
    let (_e, mut l) = root_lease();
    let t = target.display();
    let o = sh(
        &mut l,
        &format!(
            "mkdir -p /etc/apt && ln -s /oldroot{t} /etc/apt/apt.conf.d && ln -s {t} /etc/apt/x && echo planted"
        ),
    );
    assert!(o.stdout.contains("planted"), "{o:?}");
    // The next instance of the same lease starts on the same layer.
    l.stop();
    let o = sh(&mut l, "ls /etc/apt; id -u");
    assert!(o.stdout.ends_with("0\n"), "{o:?}");
    let left: Vec<_> = std::fs::read_dir(&target).unwrap().flatten().collect();
    assert!(
        left.is_empty(),
        "moat wrote on the host through a link: {left:?}"
    );
}

#[test]
fn a_named_root_inside_lease_on_a_disk_keeps_its_layer_across_releases() {
    if !available() {
        return;
    }
    image_root();
    let e = engine(BackendKind::Bwrap);
    let mut p = policy(BackendKind::Bwrap);
    p.image = Some(IMAGE.into());
    p.root_inside = true;
    p.limits.persistent_disk = Some(moat_policy::ByteSize::mib(128));
    let name = format!(
        "r1-disk-{}",
        token("n").replace(['-', '_'], "").to_lowercase()
    );
    let name: String = name.chars().take(40).collect();
    let open = || {
        e.lease(
            p.clone(),
            LeaseOptions {
                name: Some(name.clone()),
                ..LeaseOptions::default()
            },
        )
        .expect("named lease")
    };
    let mut l = open();
    let o = sh(&mut l, "echo kept > /usr/bin/kept && echo wrote");
    assert!(o.stdout.contains("wrote"), "{o:?}");
    l.release().unwrap();
    let mut l = open();
    let o = sh(&mut l, "cat /usr/bin/kept; id -u");
    assert_eq!(o.stdout, "kept\n0\n", "{o:?}");
    assert!(!image_root().join("usr/bin/kept").exists());
    l.destroy().unwrap();
}

per_backend! {
    attack_r1_kernel_cases_hold_on_an_image => |kind: BackendKind| {
        // The same probe on an image without root inside, on both backends.
        image_root();
        let e = engine(kind);
        let mut p = policy(kind);
        p.image = Some(IMAGE.into());
        let mut l = e.lease(p, LeaseOptions::default()).expect("a lease on the image");
        let snap = HostSnapshot::take(&[]);
        let o = run(&mut l, RunSpec::new(["/usr/bin/python3", "-c", SYSCALLS_PY]));
        expect_all(&o, &k4_expected(kind));
        assert_eq!(o.code(), 0, "{}", o.stderr);
        let who = sh(&mut l, "id -u");
        assert_eq!(who.stdout, "1000\n", "{who:?}");
        snap.assert_unchanged();
    };
}

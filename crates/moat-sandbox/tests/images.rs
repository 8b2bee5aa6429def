//! Root filesystem images (docs/images.md, threat model R2): import seals
//! them (root-owned, no set-id bit, no device node, FIFO or socket, links kept
//! as links and never followed on the host), refuses one without /bin/sh, and
//! a lease with `image = NAME` sees the image's directories instead of the
//! host's, on both backends.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use moat_policy::BackendKind;
use moat_sandbox::image;
use moat_sandbox::LeaseOptions;

fn fresh_dir(name: &str) -> PathBuf {
    let d = scratch().join(format!("{name}-{:x}", moat_sandbox::storage::random_u64()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn import(name: &str, src: &Path) -> moat_sandbox::Result<image::Imported> {
    let c = config();
    image::import(&c.data_dir, &c.runtime_dir, name, src)
}

/// A lease of `kind` on image `name`.
fn image_lease(kind: BackendKind, name: &str) -> (moat_sandbox::Engine, moat_sandbox::Lease) {
    let e = engine(kind);
    let mut p = policy(kind);
    p.image = Some(name.into());
    let l = e
        .lease(p, LeaseOptions::default())
        .expect("lease on the image");
    (e, l)
}

/// A decoy outside every image: a directory with a secret file, whose
/// fingerprint must not change and whose text must never be read inside.
struct Decoy {
    dir: PathBuf,
    before: Snapshot,
}

type Snapshot = Vec<(PathBuf, Option<(Vec<u8>, u32, u64)>)>;

const SECRET: &str = "decoy-secret-7f3a";

impl Decoy {
    fn new() -> Decoy {
        let dir = fresh_dir("decoy");
        std::fs::write(dir.join("secret.txt"), SECRET).unwrap();
        // An allowlisted /etc name: an image whose etc links here must not
        // make the host copy it into the sandbox's /etc.
        std::fs::write(dir.join("os-release"), SECRET).unwrap();
        let before = Decoy::snapshot(&dir);
        Decoy { dir, before }
    }
    fn snapshot(dir: &Path) -> Snapshot {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| (e.path(), fingerprint(&e.path())))
            .collect();
        v.sort();
        v.push((dir.to_path_buf(), fingerprint(dir)));
        v
    }
    fn assert_untouched(&self) {
        assert_eq!(Decoy::snapshot(&self.dir), self.before, "the decoy changed");
    }
}

fn sh_ok(lease: &mut moat_sandbox::Lease, script: &str) -> String {
    let out = sh(lease, script);
    out.stdout
}

#[test]
fn an_image_without_a_shell_is_refused_with_the_reason() {
    let src = fresh_dir("noshell");
    std::fs::create_dir_all(src.join("usr/bin")).unwrap();
    std::fs::write(src.join("usr/bin/tool"), "x").unwrap();
    // A link to the host's shell does not count: links resolve inside.
    std::os::unix::fs::symlink("/usr/bin/dash", src.join("usr/bin/sh")).unwrap();
    let err = import("noshell", &src).unwrap_err().to_string();
    assert!(err.contains("no /bin/sh"), "{err}");
    assert!(image::resolve(&config().data_dir, "noshell").is_err());
    let left: Vec<_> = std::fs::read_dir(image::images_dir(&config().data_dir).join("noshell"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != ".lock")
        .collect();
    assert!(left.is_empty(), "scratch left behind: {left:?}");
}

#[test]
fn attack_r2_setuid_files_and_device_nodes_are_sealed_out() {
    let src = rootfs::make(&fresh_dir("r2-setuid"));
    let su = src.join("usr/bin/sux");
    std::fs::copy("/usr/bin/id", &su).unwrap();
    std::fs::set_permissions(&su, std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::fs::write(src.join("usr/bin/sgid"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(
        src.join("usr/bin/sgid"),
        std::fs::Permissions::from_mode(0o2755),
    )
    .unwrap();
    std::fs::create_dir_all(src.join("dev2")).unwrap();
    let mk = |args: &[&str]| assert!(Command::new("mknod").args(args).status().unwrap().success());
    mk(&[src.join("dev2/null").to_str().unwrap(), "c", "1", "3"]);
    mk(&[src.join("dev2/disk").to_str().unwrap(), "b", "7", "0"]);
    mk(&[src.join("dev2/pipe").to_str().unwrap(), "p"]);
    let _sock = std::os::unix::net::UnixListener::bind(src.join("dev2/sock")).unwrap();
    let host_before = fingerprint(&su);

    // The same tree as a directory and as a tarball made by root's tar (which
    // keeps the device nodes and the bits).
    let tarball = fresh_dir("r2-tar").join("image.tar");
    assert!(Command::new("tar")
        .args([
            "-cf",
            tarball.to_str().unwrap(),
            "-C",
            src.to_str().unwrap(),
            "."
        ])
        .status()
        .unwrap()
        .success());
    for (name, from) in [("r2-dir", &src), ("r2-tar", &tarball)] {
        let got = import(name, from).unwrap();
        let root = &got.root;
        for f in ["usr/bin/sux", "usr/bin/sgid"] {
            let m = std::fs::symlink_metadata(root.join(f)).unwrap();
            assert_eq!(m.mode() & 0o7777, 0o755, "{name}: {f}");
            assert_eq!((m.uid(), m.gid()), (0, 0), "{name}: {f}");
        }
        for f in ["dev2/null", "dev2/disk", "dev2/pipe", "dev2/sock"] {
            assert!(
                std::fs::symlink_metadata(root.join(f)).is_err(),
                "{name}: {f} kept"
            );
        }
        let mut walk = vec![root.clone()];
        while let Some(p) = walk.pop() {
            let m = std::fs::symlink_metadata(&p).unwrap();
            let t = m.file_type();
            assert!(
                !(t.is_block_device() || t.is_char_device() || t.is_fifo() || t.is_socket()),
                "{}",
                p.display()
            );
            assert_eq!(m.mode() & 0o6000, 0, "{}", p.display());
            assert_eq!(m.uid(), 0, "{}", p.display());
            if t.is_dir() {
                walk.extend(std::fs::read_dir(&p).unwrap().flatten().map(|e| e.path()));
            }
        }
    }
    // The source on the host is as it was.
    assert_eq!(fingerprint(&su), host_before);
    assert_eq!(std::fs::metadata(&su).unwrap().mode() & 0o7777, 0o4755);

    // Inside, the sealed image shows no set-id bit and nosuid anyway.
    if backend_available(BackendKind::Bwrap) {
        let (_e, mut l) = image_lease(BackendKind::Bwrap, "r2-tar");
        let out = sh_ok(
            &mut l,
            "stat -c %a /usr/bin/sux; ls /dev2 2>&1; /usr/bin/sux -u",
        );
        assert!(out.starts_with("755\n"), "{out}");
        assert!(!out.contains("disk") && !out.contains("null"), "{out}");
        assert!(
            !out.lines().any(|l| l.trim() == "0"),
            "euid 0 via the image: {out}"
        );
    }
}

#[test]
fn attack_r2_links_pointing_out_are_never_followed() {
    let decoy = Decoy::new();
    let src = rootfs::make(&fresh_dir("r2-links"));
    let d = decoy.dir.to_str().unwrap();
    std::os::unix::fs::symlink(format!("{d}/secret.txt"), src.join("usr/share/leak")).unwrap();
    std::os::unix::fs::symlink(d, src.join("usr/share/leakdir")).unwrap();
    std::os::unix::fs::symlink(format!("../../../../../../..{d}"), src.join("usr/share/up"))
        .unwrap();
    // /etc itself a link out: the sandbox's /etc must not be copied from there.
    std::fs::remove_dir_all(src.join("etc")).unwrap();
    std::os::unix::fs::symlink(d, src.join("etc")).unwrap();

    // Tarballs whose members write through a link, hard-link out, climb
    // with `..`, or name an absolute path: sealed without them or refused
    // with the reason, and the host untouched either way.
    let evil = |file: &str, members: &str| -> PathBuf {
        let tarball = fresh_dir("r2-links-tar").join(file);
        let py = format!(
            r#"
import tarfile, io
t = tarfile.open({tar:?}, "w")
t.add({src:?}, arcname=".")
def sym(name, target):
    i = tarfile.TarInfo(name); i.type = tarfile.SYMTYPE; i.linkname = target; t.addfile(i)
def hard(name, target):
    i = tarfile.TarInfo(name); i.type = tarfile.LNKTYPE; i.linkname = target; t.addfile(i)
def reg(name, data):
    i = tarfile.TarInfo(name); i.size = len(data); t.addfile(i, io.BytesIO(data))
d = {d:?}
{members}
t.close()
"#,
            tar = tarball.to_str().unwrap(),
            src = src.to_str().unwrap(),
        );
        assert!(Command::new("python3")
            .arg("-c")
            .arg(&py)
            .status()
            .unwrap()
            .success());
        tarball
    };
    let through = evil("through.tar", "sym('./evil', d)\nreg('./evil/pwned', b'written through a link')\nreg(d + '/absolute', b'absolute')");
    let hardlink = evil("hard.tar", "hard('./hard', d + '/secret.txt')");
    let climb = evil(
        "climb.tar",
        "reg('../../../../../../..' + d + '/climbed', b'climbed')",
    );

    let a = import("r2-links-dir", &src).unwrap();
    decoy.assert_untouched();
    assert_eq!(
        std::fs::read_link(a.root.join("usr/share/leak")).unwrap(),
        Path::new(d).join("secret.txt")
    );
    assert!(std::fs::symlink_metadata(a.root.join("etc"))
        .unwrap()
        .file_type()
        .is_symlink());
    let mut images = vec!["r2-links-dir".to_string()];
    for (name, tar) in [
        ("r2-through", &through),
        ("r2-hard", &hardlink),
        ("r2-climb", &climb),
    ] {
        match import(name, tar) {
            Ok(got) => {
                if let Ok(m) = std::fs::symlink_metadata(got.root.join("evil")) {
                    assert!(m.file_type().is_symlink(), "{name}: evil");
                }
                images.push(name.to_string());
            }
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains("unpacking") && e.contains("tar:"), "{name}: {e}");
                assert!(image::resolve(&config().data_dir, name).is_err(), "{name}");
            }
        }
        decoy.assert_untouched();
        for p in ["pwned", "climbed", "absolute"] {
            assert!(
                !decoy.dir.join(p).exists(),
                "{name}: {p} written on the host"
            );
        }
    }
    // The `..` member is refused, naming it.
    let e = import("r2-climb", &climb).unwrap_err().to_string();
    assert!(e.contains("climbed"), "{e}");

    // Inside, nothing of the decoy is readable through the image.
    for kind in [BackendKind::Bwrap, BackendKind::Gvisor] {
        if !backend_available(kind) {
            continue;
        }
        for name in &images {
            let (_e, mut l) = image_lease(kind, name);
            let out = sh(
                &mut l,
                "cat /usr/share/leak /usr/share/leakdir/secret.txt /usr/share/up/secret.txt /evil/secret.txt /hard /etc/os-release; ls /etc; cat /usr/share/marker",
            );
            let all = format!("{}{}", out.stdout, out.stderr);
            assert!(!all.contains(SECRET), "{kind:?} {name}: {all}");
            assert!(
                out.stdout.contains("from the image"),
                "{kind:?} {name}: {all}"
            );
        }
    }
    decoy.assert_untouched();
}

per_backend! {
    an_image_replaces_the_host_system_directories => |kind: BackendKind| {
        let src = rootfs::make(&fresh_dir("plain"));
        let name = format!("plain-{}", kind.name());
        let first = import(&name, &src).unwrap();
        let (_e, mut l) = image_lease(kind, &name);
        let out = sh(&mut l, "cat /usr/share/marker; cat /etc/os-release; id -u; ls /usr/bin/python3 2>&1 || echo no-python");
        assert!(out.stdout.contains("from the image"), "{out:?}");
        assert!(out.stdout.contains("ID=moat-test-image"), "{out:?}");
        assert!(out.stdout.contains("no-python"), "the host's /usr is visible: {out:?}");
        assert!(out.stdout.contains("1000"), "{out:?}");
        // Read-only inside.
        let w = sh(&mut l, "touch /usr/share/x 2>&1 || echo refused");
        assert!(w.stdout.contains("refused"), "{w:?}");
        // A second import switches `current`; the running lease keeps its version.
        std::fs::write(src.join("usr/share/marker"), "second version\n").unwrap();
        let second = import(&name, &src).unwrap();
        assert_ne!(first.version, second.version);
        assert_eq!(image::resolve(&config().data_dir, &name).unwrap(), second.root);
        let again = sh(&mut l, "cat /usr/share/marker");
        assert!(again.stdout.contains("from the image"), "{again:?}");
        let (_e2, mut l2) = image_lease(kind, &name);
        assert!(sh(&mut l2, "cat /usr/share/marker").stdout.contains("second version"));
        let names: Vec<String> = image::list(&config().data_dir).into_iter().map(|i| i.name).collect();
        assert!(names.contains(&name), "{names:?}");
    };
    moats_own_binaries_run_on_an_image_without_the_hosts_libc => |kind: BackendKind| {
        // An image with no loader and no libc: its /bin/sh is a static binary.
        let src = fresh_dir("nolibc");
        std::fs::create_dir_all(src.join("usr/bin")).unwrap();
        std::fs::copy("/usr/sbin/ldconfig", src.join("usr/bin/sh")).unwrap();
        std::fs::copy("/usr/bin/id", src.join("usr/bin/id")).unwrap();
        std::os::unix::fs::symlink("usr/bin", src.join("bin")).unwrap();
        let name = format!("nolibc-{}", kind.name());
        import(&name, &src).unwrap();
        let e = engine(kind);
        let mut p = policy(kind);
        p.image = Some(name);
        let opts = LeaseOptions {
            network: Some(moat_sandbox::NetworkAttachment {
                netns: empty_netns(),
                env: Vec::new(),
                // Stands in for the built-in agent's moat binary.
                files: vec![(PathBuf::from("/usr/bin/id"), PathBuf::from("/run/moat/bin/id"))],
            }),
            ..LeaseOptions::default()
        };
        let mut l = e.lease(p, opts).expect("a lease on the image");
        let o = run(&mut l, moat_sandbox::RunSpec::new(["/run/moat/bin/id", "-u"]));
        assert_eq!(o.stdout, "1000\n", "{o:?}");
        // The same program from the image itself cannot start: the image has no
        // loader, and only moat's own binaries are started through the host's.
        let o = run(&mut l, moat_sandbox::RunSpec::new(["/usr/bin/id", "-u"]));
        assert!(o.code() != 0 && o.stdout.is_empty(), "{o:?}");
    };
}

#[test]
fn a_lease_on_a_missing_image_is_refused_naming_it() {
    let e = engine(BackendKind::Bwrap);
    let mut p = policy(BackendKind::Bwrap);
    p.image = Some("no-such-image".into());
    let err = e
        .lease(p, LeaseOptions::default())
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("no-such-image") && err.contains("moat image"),
        "{err}"
    );
}

#[test]
fn rm_removes_an_image_no_sandbox_uses_and_pruning_spares_used_versions() {
    let src = rootfs::make(&fresh_dir("rm"));
    let first = import("to-remove", &src).unwrap();
    if backend_available(BackendKind::Bwrap) {
        // A sandbox on the first version: two more imports leave it in place
        // (pruning keeps two, and never one in use), and rm is refused.
        let (_e, mut l) = image_lease(BackendKind::Bwrap, "to-remove");
        import("to-remove", &src).unwrap();
        import("to-remove", &src).unwrap();
        assert!(first.root.is_dir(), "a version in use was pruned");
        let err = image::remove(&config().data_dir, "to-remove")
            .unwrap_err()
            .to_string();
        assert!(err.contains("in use"), "{err}");
        assert_eq!(
            sh(&mut l, "cat /usr/share/marker").stdout,
            "from the image\n"
        );
        drop(l);
        // Unused now: the next import prunes it.
        import("to-remove", &src).unwrap();
        assert!(!first.root.exists(), "an unused old version was kept");
    }
    image::remove(&config().data_dir, "to-remove").unwrap();
    assert!(image::resolve(&config().data_dir, "to-remove").is_err());
    assert!(image::remove(&config().data_dir, "to-remove").is_err());
}

/// An empty network namespace of a short-lived process (a door's stand-in).
fn empty_netns() -> std::sync::Arc<std::os::fd::OwnedFd> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new("sleep");
    cmd.arg("30");
    // SAFETY: one async-signal-safe system call.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let f = std::fs::File::open(format!("/proc/{}/ns/net", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    std::sync::Arc::new(std::os::fd::OwnedFd::from(f))
}

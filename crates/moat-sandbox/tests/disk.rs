//! Disk-backed persistent workspaces (docs/workspaces.md, docs/threat-model.md
//! R3): a named lease with `persistent_disk` keeps its files on a checked ext4
//! image under the data directory, unmounted between uses, kept across a
//! restart of the engine; a full disk gives ENOSPC inside and nothing outside
//! changes; a damaged image is set aside, never mounted, and the user told.
//! Real bwrap and gVisor sandboxes, real loop mounts; each test checks that no
//! mount or loop device of its own is left behind.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use moat_policy::{BackendKind, ByteSize, SandboxPolicy};
use moat_sandbox::{Engine, LeaseOptions};

fn disk_policy(kind: BackendKind, mib: u64) -> SandboxPolicy {
    let mut p = policy(kind);
    p.limits.persistent_disk = Some(ByteSize::mib(mib));
    p
}

fn named(e: &Engine, p: &SandboxPolicy, name: &str) -> moat_sandbox::Lease {
    e.lease(
        p.clone(),
        LeaseOptions {
            name: Some(name.to_string()),
            ..LeaseOptions::default()
        },
    )
    .expect("named lease")
}

fn image(name: &str) -> PathBuf {
    config().data_dir.join("disks").join(format!("{name}.img"))
}

/// Mount points and loop devices that mention `needle` (this test's names).
fn leftovers(needle: &str) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect();
    let loops = std::process::Command::new("losetup")
        .arg("-a")
        .output()
        .unwrap();
    out.extend(
        String::from_utf8_lossy(&loops.stdout)
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string),
    );
    out
}

fn unique(tag: &str) -> String {
    format!(
        "{tag}-{:x}",
        moat_sandbox::storage::random_u64() & 0xffff_ffff
    )
}

fn kept_between_uses_and_restarts(kind: BackendKind) {
    if !backend_available(kind) {
        eprintln!("skipped: {} is not available here", kind.name());
        return;
    }
    let name = unique("keep");
    let p = disk_policy(kind, 256);
    let e = engine(kind);
    let mut l = named(&e, &p, &name);
    assert!(l.on_disk());
    let o = sh(
        &mut l,
        "echo kept-$((6*7)) > /workspace/f && echo home > ~/h && df -k /workspace | tail -1",
    );
    assert_eq!(o.code(), 0, "{o:?}");
    l.release().unwrap();
    // Between uses: unmounted, no loop device, the image alone on the host.
    assert!(leftovers(&name).is_empty(), "{:?}", leftovers(&name));
    let img = image(&name);
    assert!(img.is_file());
    // A new engine (a restart of moat up) finds the files again.
    drop(e);
    let e = engine(kind);
    let mut l = named(&e, &p, &name);
    let o = sh(&mut l, "cat /workspace/f ~/h");
    assert_eq!(o.stdout, "kept-42\nhome\n", "{o:?}");
    assert!(l.take_notices().is_empty());
    l.destroy().unwrap();
    assert!(!img.exists(), "destroy deletes the image");
    assert!(leftovers(&name).is_empty(), "{:?}", leftovers(&name));
}

#[test]
fn bwrap_a_disk_workspace_is_kept_between_uses_and_restarts() {
    kept_between_uses_and_restarts(BackendKind::Bwrap);
}

#[test]
fn gvisor_a_disk_workspace_is_kept_between_uses_and_restarts() {
    kept_between_uses_and_restarts(BackendKind::Gvisor);
}

/// Bytes the host filesystem has free under `p`.
fn host_free(p: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(p).unwrap();
    s.blocks_available() as u64 * s.fragment_size() as u64
}

fn full_disk(kind: BackendKind) {
    if !backend_available(kind) {
        eprintln!("skipped: {} is not available here", kind.name());
        return;
    }
    let name = unique("full");
    let other = unique("other");
    let e = engine(kind);
    let p = disk_policy(kind, 64);
    let mut victim = named(&e, &p, &other);
    let o = sh(&mut victim, "echo mine > /workspace/mine");
    assert_eq!(o.code(), 0, "{o:?}");
    let mut l = named(&e, &p, &name);
    // The attack: write far past the disk's size, in the workspace, home
    // and /tmp alike (one filesystem), and many small files.
    let o = sh(
        &mut l,
        "dd if=/dev/zero of=/workspace/big bs=1M count=512 2>&1; echo dd=$?; \
         dd if=/dev/zero of=/tmp/big2 bs=1M count=64 2>&1; echo dd2=$?; \
         echo done",
    );
    assert!(o.stdout.contains("No space left on device"), "{o:?}");
    assert!(
        !o.stdout.contains("dd=0"),
        "the write past the size succeeded: {o:?}"
    );
    assert!(o.stdout.contains("done"), "{o:?}");
    // The image file is not reachable from inside (its path on the host).
    let img = image(&name);
    let probe = format!(
        "test -e {} && echo IMAGE-SEEN; ls -d {} 2>&1; echo probed",
        img.display(),
        img.parent().unwrap().display()
    );
    let o = sh(&mut l, &probe);
    assert!(
        !o.stdout.contains("IMAGE-SEEN") && o.stdout.contains("probed"),
        "{o:?}"
    );
    // Outside: the image is the only thing the writes reached on the host,
    // and it takes at most its size. (The host's free space is shared with
    // whatever else runs on this machine, so it is not compared here.)
    use std::os::unix::fs::MetadataExt;
    let used = std::fs::metadata(&img).unwrap().blocks() * 512;
    assert!(used <= 64 << 20, "the image grew past its size: {used}");
    assert!(host_free(&config().data_dir) > 0);
    // Another workspace is untouched and still writable.
    let o = sh(
        &mut victim,
        "cat /workspace/mine && echo more > /workspace/more && echo ok",
    );
    assert_eq!(o.stdout, "mine\nok\n", "{o:?}");
    // The image's permissions: only root on the host reaches it.
    let dir_mode = std::fs::metadata(img.parent().unwrap()).unwrap().mode() & 0o777;
    assert_eq!(dir_mode, 0o700);
    l.destroy().unwrap();
    victim.destroy().unwrap();
    assert!(leftovers(&name).is_empty() && leftovers(&other).is_empty());
}

#[test]
fn attack_r3_bwrap_a_full_disk_workspace_gives_enospc_inside_and_nothing_outside() {
    full_disk(BackendKind::Bwrap);
}

#[test]
fn attack_r3_gvisor_a_full_disk_workspace_gives_enospc_inside_and_nothing_outside() {
    full_disk(BackendKind::Gvisor);
}

#[test]
fn a_damaged_disk_is_set_aside_never_mounted_and_the_user_told() {
    let kind = BackendKind::Bwrap;
    let name = unique("damaged");
    let e = engine(kind);
    let p = disk_policy(kind, 64);
    let mut l = named(&e, &p, &name);
    let o = sh(&mut l, "echo before > /workspace/f");
    assert_eq!(o.code(), 0, "{o:?}");
    l.release().unwrap();
    // A crash or a bad disk: the superblock and the group descriptors
    // overwritten (ext4's primary superblock is at byte 1024).
    let img = image(&name);
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.seek(SeekFrom::Start(1024)).unwrap();
        f.write_all(&[0xA5; 8192]).unwrap();
        f.sync_all().unwrap();
    }
    let damaged = std::fs::read(&img).unwrap();
    let mut l = named(&e, &p, &name);
    let notices = l.take_notices();
    assert!(
        notices.len() == 1 && notices[0].contains("damaged") && notices[0].contains("e2fsck"),
        "{notices:?}"
    );
    // The workspace starts empty on a fresh disk; the damaged image is kept
    // aside, byte for byte, for the operator.
    let o = sh(&mut l, "ls -A /workspace; echo listed");
    assert_eq!(o.stdout, "listed\n", "{o:?}");
    let aside: Vec<PathBuf> = std::fs::read_dir(img.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&format!("{name}.img.damaged-"))
        })
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(std::fs::read(&aside[0]).unwrap(), damaged);
    l.destroy().unwrap();
    std::fs::remove_file(&aside[0]).unwrap();
    assert!(leftovers(&name).is_empty(), "{:?}", leftovers(&name));
}

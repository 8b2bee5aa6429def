//! A minimal root filesystem for image tests: a few of the host's binaries
//! and the libraries `ldd` names, laid out merged-usr (`/bin -> usr/bin`).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The binaries a test image carries (`/bin/sh` is dash).
pub const TOOLS: &[&str] = &[
    "dash", "cat", "ls", "id", "stat", "touch", "mkdir", "rm", "echo", "true", "chmod", "mount",
    "unshare", "ln", "readlink", "cp", "grep", "sleep",
];

fn copy_file(from: &Path, root: &Path) {
    let rel = from.strip_prefix("/").unwrap();
    let rel = if let Ok(r) = rel.strip_prefix("lib") {
        Path::new("usr/lib").join(r)
    } else if let Ok(r) = rel.strip_prefix("lib64") {
        Path::new("usr/lib64").join(r)
    } else {
        rel.to_path_buf()
    };
    let to = root.join(rel);
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    let real = std::fs::canonicalize(from).unwrap();
    std::fs::copy(&real, &to).unwrap();
}

/// Builds the image tree at `root` (created); returns it.
pub fn make(root: &Path) -> PathBuf {
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    for t in TOOLS {
        let bin = Path::new("/usr/bin").join(t);
        if !bin.exists() {
            continue;
        }
        copy_file(&bin, root);
        let out = Command::new("ldd").arg(&bin).output().unwrap();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let path = line
                .split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(PathBuf::from);
            if let Some(p) = path {
                copy_file(&p, root);
            }
        }
    }
    std::os::unix::fs::symlink("dash", root.join("usr/bin/sh")).unwrap();
    for (l, t) in [
        ("bin", "usr/bin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
        ("sbin", "usr/bin"),
    ] {
        std::os::unix::fs::symlink(t, root.join(l)).unwrap();
    }
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/os-release"), "ID=moat-test-image\n").unwrap();
    std::fs::create_dir_all(root.join("usr/share")).unwrap();
    std::fs::write(root.join("usr/share/marker"), "from the image\n").unwrap();
    root.to_path_buf()
}

/// [`make`] plus the host's Python 3 (interpreter, standard library and the
/// libraries `ldd` names), for probes written in Python.
pub fn make_with_python(root: &Path) -> PathBuf {
    make(root);
    let py = std::fs::canonicalize("/usr/bin/python3").unwrap();
    copy_file(&py, root);
    let name = py.file_name().unwrap().to_str().unwrap().to_string();
    std::os::unix::fs::symlink(&name, root.join("usr/bin/python3")).unwrap();
    let out = Command::new("ldd").arg(&py).output().unwrap();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(p) = line.split_whitespace().find(|w| w.starts_with('/')) {
            copy_file(Path::new(p), root);
        }
    }
    let lib = Path::new("/usr/lib").join(&name);
    assert!(Command::new("cp")
        .arg("-a")
        .arg(&lib)
        .arg(root.join("usr/lib"))
        .status()
        .unwrap()
        .success());
    // The C extension modules' own libraries (ssl, ffi, ...).
    let dynload = root.join("usr/lib").join(&name).join("lib-dynload");
    for e in std::fs::read_dir(&dynload).into_iter().flatten().flatten() {
        let out = Command::new("ldd").arg(e.path()).output().unwrap();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(p) = line.split_whitespace().find(|w| w.starts_with('/')) {
                let rel = p.trim_start_matches('/');
                if !root.join(rel).exists() && !root.join("usr").join(rel).exists() {
                    copy_file(Path::new(p), root);
                }
            }
        }
    }
    root.to_path_buf()
}

/// Copies a host binary and the libraries `ldd` names into the image.
fn add_binary(root: &Path, bin: &Path) {
    copy_file(bin, root);
    let out = Command::new("ldd").arg(bin).output().unwrap();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(p) = line.split_whitespace().find(|w| w.starts_with('/')) {
            copy_file(Path::new(p), root);
        }
    }
}

/// [`make`] plus the host's apt and dpkg (binaries, fetch methods, their
/// libraries and empty state directories): enough for `apt-get update` and
/// `apt-get install` from a `[trusted=yes]` mirror written in
/// `etc/apt/sources.list` afterwards.
pub fn make_with_apt(root: &Path) -> PathBuf {
    make(root);
    for b in [
        "apt-get",
        "apt-config",
        "apt-cache",
        "dpkg",
        "dpkg-deb",
        "dpkg-query",
        "dpkg-split",
        "dpkg-trigger",
        "tar",
        "gzip",
        "xz",
        "find",
    ] {
        let p = Path::new("/usr/bin").join(b);
        if p.exists() {
            add_binary(root, &p);
        }
    }
    // dpkg checks that these exist before it unpacks anything.
    for b in [
        "/usr/bin/diff",
        "/usr/sbin/ldconfig",
        "/usr/sbin/start-stop-daemon",
    ] {
        if Path::new(b).exists() {
            add_binary(root, Path::new(b));
        }
    }
    for m in ["http", "file", "store", "copy", "gpgv"] {
        add_binary(root, &Path::new("/usr/lib/apt/methods").join(m));
    }
    for d in [
        "etc/apt/apt.conf.d",
        "etc/apt/preferences.d",
        "etc/apt/sources.list.d",
        "etc/apt/trusted.gpg.d",
        "etc/dpkg/dpkg.cfg.d",
        "var/lib/apt/lists/partial",
        "var/cache/apt/archives/partial",
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
        "var/lib/dpkg/alternatives",
        "var/log/apt",
        "usr/share/doc",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    for f in ["var/lib/dpkg/status", "var/lib/dpkg/available"] {
        std::fs::write(root.join(f), "").unwrap();
    }
    // dpkg's architecture tables.
    std::fs::create_dir_all(root.join("usr/share/dpkg")).unwrap();
    for t in ["cputable", "ostable", "tupletable", "abitable"] {
        let p = Path::new("/usr/share/dpkg").join(t);
        if p.exists() {
            std::fs::copy(&p, root.join("usr/share/dpkg").join(t)).unwrap();
        }
    }
    // dpkg's idea of the architecture, as the host's.
    std::fs::write(root.join("var/lib/dpkg/arch"), "amd64\n").unwrap();
    root.to_path_buf()
}

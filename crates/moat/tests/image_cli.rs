//! `moat image` and `moat sandbox run --image NAME [--root-inside]` from the
//! command line (docs/images.md): import, list and remove an image; with
//! root inside, `apt-get install` of a package from a local mirror (a
//! `[trusted=yes]` repository served on 127.0.0.1, reached through the
//! sandbox's door) works inside, and the next sandbox has none of it; the
//! image on the host is unchanged.

#[path = "../../moat-sandbox/tests/common/rootfs.rs"]
mod rootfs;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("moat-image-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o711)).unwrap();
    d
}

fn moat(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moat"))
        .env("MOAT_DATA_DIR", dir.join("data"))
        .env("MOAT_RUNTIME_DIR", dir.join("run"))
        .env_remove("MOAT_LOG")
        .stdin(Stdio::null())
        .args(args)
        .output()
        .expect("running moat")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Serves the files of `dir` over HTTP/1.0 on 127.0.0.1 (GET only), forever.
fn serve(dir: PathBuf) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let dir = dir.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut first = String::new();
                let _ = r.read_line(&mut first);
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                }
                let path = first.split_whitespace().nth(1).unwrap_or("/");
                let path = path
                    .split("://")
                    .nth(1)
                    .map_or(path, |rest| rest.find('/').map_or("/", |i| &rest[i..]));
                let rel = path.trim_start_matches('/');
                let mut s = s;
                match (rel.contains(".."), std::fs::read(dir.join(rel))) {
                    (false, Ok(body)) if !rel.is_empty() => {
                        let _ = write!(
                            s,
                            "HTTP/1.0 200 OK\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
                            body.len()
                        );
                        let _ = s.write_all(&body);
                    }
                    _ => {
                        let _ = s.write_all(b"HTTP/1.0 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
                    }
                }
                let _ = s.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    port
}

/// A one-package repository: `hello-moat` installs /usr/bin/hello-moat.
fn mirror(dir: &Path) {
    let pkg = dir.join("pkg");
    std::fs::create_dir_all(pkg.join("DEBIAN")).unwrap();
    std::fs::create_dir_all(pkg.join("usr/bin")).unwrap();
    std::fs::write(
        pkg.join("DEBIAN/control"),
        "Package: hello-moat\nVersion: 1.0\nArchitecture: all\nMaintainer: moat tests <t@example.invalid>\nDescription: a test package\n",
    )
    .unwrap();
    std::fs::write(
        pkg.join("usr/bin/hello-moat"),
        "#!/bin/sh\necho hello from the mirror\n",
    )
    .unwrap();
    std::fs::set_permissions(
        pkg.join("usr/bin/hello-moat"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let repo = dir.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let built = Command::new("dpkg-deb")
        .args(["--build", "--root-owner-group", "-Zgzip"])
        .arg(&pkg)
        .arg(repo.join("hello-moat_1.0_all.deb"))
        .output()
        .unwrap();
    assert!(built.status.success(), "{}", text(&built));
    let scan = Command::new("dpkg-scanpackages")
        .args([".", "/dev/null"])
        .current_dir(&repo)
        .output()
        .unwrap();
    assert!(scan.status.success(), "{}", text(&scan));
    std::fs::write(repo.join("Packages"), &scan.stdout).unwrap();
}

fn tools_present() -> bool {
    ["bwrap", "dpkg-deb", "dpkg-scanpackages", "apt-get"]
        .iter()
        .all(|t| {
            Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {t}"))
                .output()
                .is_ok_and(|o| o.status.success())
        })
}

#[test]
fn import_list_run_and_rm_an_image() {
    let dir = scratch("basic");
    let src = rootfs::make(&dir.join("src"));
    let o = moat(&dir, &["image", "import", "tiny", src.to_str().unwrap()]);
    assert!(
        o.status.success() && text(&o).contains("moat: imported tiny"),
        "{}",
        text(&o)
    );
    let o = moat(&dir, &["image", "list"]);
    assert!(text(&o).starts_with("tiny\t"), "{}", text(&o));
    let o = moat(
        &dir,
        &[
            "sandbox",
            "run",
            "--image",
            "tiny",
            "--",
            "cat",
            "/usr/share/marker",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "from the image\n",
        "{}",
        text(&o)
    );
    let o = moat(
        &dir,
        &["sandbox", "run", "--image", "none-such", "--", "true"],
    );
    assert!(
        !o.status.success() && text(&o).contains("no image \"none-such\""),
        "{}",
        text(&o)
    );
    let o = moat(&dir, &["sandbox", "run", "--root-inside", "--", "true"]);
    assert!(
        !o.status.success() && text(&o).contains("--image"),
        "{}",
        text(&o)
    );
    let o = moat(&dir, &["image", "rm", "tiny"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = moat(&dir, &["image", "list"]);
    assert!(text(&o).starts_with("no images"), "{}", text(&o));
    let o = moat(
        &dir,
        &["image", "import", "Bad/Name", src.to_str().unwrap()],
    );
    assert!(
        !o.status.success() && text(&o).contains("not an image name"),
        "{}",
        text(&o)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn apt_get_install_from_a_local_mirror_works_as_root_inside_and_is_gone_after() {
    if !tools_present() {
        panic!("this test needs bwrap, dpkg-deb, dpkg-scanpackages and apt-get on the host");
    }
    let dir = scratch("apt");
    mirror(&dir);
    let port = serve(dir.join("repo"));
    let src = rootfs::make_with_apt(&dir.join("src"));
    std::fs::write(
        src.join("etc/apt/sources.list"),
        format!("deb [trusted=yes] http://mirror.test:{port}/ ./\n"),
    )
    .unwrap();
    let o = moat(&dir, &["image", "import", "apt", src.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let allow = format!("mirror.test:{port}");
    let net = [
        "--allow-domain",
        allow.as_str(),
        "--resolve",
        "mirror.test=127.0.0.1",
    ];
    let run = |script: &str| {
        let mut args = vec![
            "sandbox",
            "run",
            "--image",
            "apt",
            "--root-inside",
            "--timeout",
            "120s",
        ];
        args.extend(net);
        args.extend(["--", "/bin/sh", "-c", script]);
        moat(&dir, &args)
    };
    let o = run(
        "apt-get update -q && apt-get install -y -q hello-moat >/dev/null && id -u && hello-moat",
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{}", text(&o));
    assert!(out.ends_with("0\nhello from the mirror\n"), "{}", text(&o));
    // A new sandbox: the package is not there; the image never had it.
    let o = run("command -v hello-moat || echo gone");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "gone\n", "{}", text(&o));
    let root = std::fs::canonicalize(dir.join("data/images/apt/current"))
        .unwrap()
        .join("root");
    assert!(!root.join("usr/bin/hello-moat").exists());
    assert_eq!(
        std::fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap(),
        ""
    );
    let _ = std::fs::remove_dir_all(&dir);
}

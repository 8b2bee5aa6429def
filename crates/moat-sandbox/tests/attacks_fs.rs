//! docs/threat-model.md, filesystem (F1-F7) and the lease-reuse and cross-lease part of
//! C3, run for real against every backend. Each test attacks from inside a
//! sandbox, asserts the attack failed the way it must, and asserts the host is
//! unchanged.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::host::*;
use common::*;
use moat_policy::{BackendKind, ByteSize, MountRequest};
use moat_sandbox::fsguard::open_in_workspace;
use moat_sandbox::{
    Engine, EngineConfig, LeaseOptions, RunSpec, SandboxError, Termination, WorkspaceSource,
};

/// Python helpers: `attempt(name, f)` prints `name OK` or `name ERRNO`.
const PRELUDE: &str = r##"
import os, errno, sys, stat
def attempt(name, f):
    try:
        f()
        print(name, "OK")
    except OSError as e:
        print(name, errno.errorcode.get(e.errno, str(e.errno)))
def write(p, data="pwned"):
    with open(p, "w") as fh:
        fh.write(data)
def append(p):
    with open(p, "a") as fh:
        fh.write("pwned")
def read(p):
    with open(p, "rb") as fh:
        return fh.read()
"##;

/// gVisor's root, system directories and /dev are owned by the (mapped) host
/// root, so a write there fails the permission check (EACCES, or EPERM for
/// chmod) before the read-only check (EROFS), and it has no /run: different
/// errnos for the same denial. Widens bwrap's expectations accordingly.
fn denial_for(
    kind: BackendKind,
    expected: &[(&'static str, &'static str)],
) -> Vec<(&'static str, String)> {
    expected
        .iter()
        .map(|(k, v)| {
            let mut v = v.to_string();
            if kind == BackendKind::Gvisor && v.contains("EROFS") {
                v.push_str("|EACCES|EPERM");
                if k.contains("run") || k.contains("moat_init") {
                    v.push_str("|ENOENT");
                }
            }
            (*k, v)
        })
        .collect()
}

fn expect_for(kind: BackendKind, o: &Output, expected: &[(&'static str, &'static str)]) {
    let exp = denial_for(kind, expected);
    let exp: Vec<(&str, &str)> = exp.iter().map(|(k, v)| (*k, v.as_str())).collect();
    expect_all(o, &exp);
}

fn chown_tree(dir: &Path, uid: u32) {
    let st = std::process::Command::new("chown")
        .args(["-R", &format!("{uid}:{uid}")])
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.success());
}

/// Every path under `dir` (not following symlinks), relative.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(dir).unwrap().to_path_buf());
            if e.file_type().unwrap().is_dir() {
                todo.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Fingerprints of every entry under `dir`.
fn tree_fingerprint(dir: &Path) -> BTreeMap<PathBuf, Print> {
    walk(dir)
        .into_iter()
        .map(|p| {
            let f = fingerprint(&dir.join(&p));
            (p, f)
        })
        .collect()
}

per_backend! {
    // ---- F1 -------------------------------------------------------------
    attack_f1_write_to_etc_usr_root_and_data_dir_fails => |kind| {
        let (_e, mut l) = lease(kind);
        let snap = HostSnapshot::take(&[]);
        let m = token("f1");
        let cfg = config();
        let code = PRELUDE.to_string() + r##"
M = "@M@"; DATA = "@DATA@"; RUN = "@RUN@"; LEASES = "@LEASES@"
attempt("etc_new", lambda: write("/etc/" + M))
attempt("etc_passwd", lambda: write("/etc/passwd"))
attempt("etc_hosts_append", lambda: append("/etc/hosts"))
attempt("etc_rename", lambda: os.rename("/etc/passwd", "/etc/" + M))
attempt("etc_symlink", lambda: os.symlink("/tmp", "/etc/" + M))
attempt("usr_new", lambda: write("/usr/" + M))
attempt("usr_bin_new", lambda: write("/usr/bin/" + M))
attempt("usr_bin_env_overwrite", lambda: write("/usr/bin/env"))
attempt("usr_bin_env_unlink", lambda: os.unlink("/usr/bin/env"))
# 0o777: a setuid mode is refused earlier, by the filter (attacks_setuid.rs).
attempt("usr_bin_env_chmod", lambda: os.chmod("/usr/bin/env", 0o777))
attempt("usr_lib_mkdir", lambda: os.mkdir("/usr/lib/" + M))
attempt("bin_via_symlink", lambda: write("/bin/" + M))
attempt("root_fs_file", lambda: write("/" + M))
attempt("root_fs_mkdir", lambda: os.mkdir("/" + M))
attempt("root_fs_rename_etc", lambda: os.rename("/etc", "/" + M))
attempt("host_home_file", lambda: write("/root/" + M))
attempt("host_home_mkdir", lambda: os.makedirs("/root/.ssh"))
attempt("data_dir_file", lambda: write(DATA + "/" + M))
attempt("leases_dir", lambda: write(LEASES + "/" + M))
attempt("runtime_dir_file", lambda: write(RUN + "/" + M))
attempt("moat_init_overwrite", lambda: write("/run/moat/init"))
attempt("run_new", lambda: write("/run/" + M))
attempt("dev_new", lambda: write("/dev/" + M))
attempt("dev_mkdir", lambda: os.mkdir("/dev/" + M))
attempt("dev_null_replace", lambda: os.rename("/dev/zero", "/dev/null"))
attempt("proc_root_etc", lambda: write("/proc/1/root/etc/" + M))
attempt("proc_sys", lambda: write("/proc/sys/kernel/hostname", "pwned"))
# The lease's own places are writable: the control that the writes above were real.
attempt("workspace", lambda: write("/workspace/" + M))
attempt("home", lambda: write("/home/agent/" + M))
attempt("tmp", lambda: write("/tmp/" + M))
# Recreating the data dir's path inside only writes into the lease's own /tmp.
attempt("data_dir_recreated", lambda: (os.makedirs(DATA, exist_ok=True), write(DATA + "/" + M)))
attempt("dev_null_write", lambda: write("/dev/null"))
attempt("dev_full_write", lambda: write("/dev/full"))
for n in ["null", "zero", "full", "random", "urandom", "tty"]:
    print("chr_" + n, "yes" if stat.S_ISCHR(os.stat("/dev/" + n).st_mode) else "no")
print("zero_reads_zeros", "yes" if open("/dev/zero", "rb").read(64) == bytes(64) else "no")
print("urandom_reads_random", "yes" if len(set(open("/dev/urandom", "rb").read(64))) > 16 else "no")
"##;
        let code = code
            .replace("@M@", &m)
            .replace("@DATA@", &cfg.data_dir.to_string_lossy())
            .replace("@RUN@", &cfg.runtime_dir.to_string_lossy())
            .replace("@LEASES@", &_e.leases_dir().to_string_lossy());
        let o = py(&mut l, &code);
        expect_for(kind, &o, &[
            ("etc_new", "EROFS"),
            ("etc_passwd", "EROFS"),
            ("etc_hosts_append", "EACCES|EROFS"),
            ("etc_rename", "EROFS"),
            ("etc_symlink", "EROFS"),
            ("usr_new", "EROFS"),
            ("usr_bin_new", "EROFS"),
            ("usr_bin_env_overwrite", "EROFS"),
            ("usr_bin_env_unlink", "EROFS"),
            ("usr_bin_env_chmod", "EROFS"),
            ("usr_lib_mkdir", "EROFS"),
            ("bin_via_symlink", "EROFS"),
            ("root_fs_file", "EROFS"),
            ("root_fs_mkdir", "EROFS"),
            ("root_fs_rename_etc", "EROFS|EBUSY"),
            // There is no /root inside, and / is read-only.
            ("host_home_file", "ENOENT"),
            ("host_home_mkdir", "EROFS"),
            // The host's data and runtime directories do not exist inside.
            ("data_dir_file", "ENOENT"),
            ("leases_dir", "ENOENT"),
            ("runtime_dir_file", "ENOENT"),
            ("moat_init_overwrite", "EROFS"),
            ("run_new", "EROFS"),
            ("dev_new", "EROFS"),
            ("dev_mkdir", "EROFS"),
            ("dev_null_replace", "EROFS|EBUSY"),
            // bwrap: PID 1 is not dumpable, its root is out of reach (K9).
            ("proc_root_etc", "EROFS|EACCES"),
            ("proc_sys", "EACCES|EROFS|EPERM"),
            ("workspace", "OK"),
            ("home", "OK"),
            ("tmp", "OK"),
            // Only where the path lies in one of the lease's own places.
            ("data_dir_recreated", if cfg.data_dir.starts_with("/tmp") { "OK" } else { "EROFS|ENOENT|EACCES" }),
            ("dev_null_write", "OK"),
            ("dev_full_write", "ENOSPC"),
            ("chr_null", "yes"),
            ("chr_zero", "yes"),
            ("chr_full", "yes"),
            ("chr_random", "yes"),
            ("chr_urandom", "yes"),
            ("chr_tty", "yes"),
            ("zero_reads_zeros", "yes"),
            ("urandom_reads_random", "yes"),
        ]);
        // The host saw none of it.
        snap.assert_unchanged();
        for p in [
            PathBuf::from("/etc").join(&m),
            PathBuf::from("/usr").join(&m),
            PathBuf::from("/usr/bin").join(&m),
            PathBuf::from("/").join(&m),
            PathBuf::from("/root").join(&m),
            PathBuf::from("/run").join(&m),
            cfg.data_dir.join(&m),
            _e.leases_dir().join(&m),
            cfg.runtime_dir.join(&m),
        ] {
            assert!(!p.exists(), "{} appeared on the host", p.display());
        }
        // The in-sandbox copy of the data dir path is inside the lease's own
        // storage, nowhere else under the data dir.
        let storage = l.storage_dir();
        for p in walk(&cfg.data_dir) {
            let full = cfg.data_dir.join(&p);
            if p.to_string_lossy().contains(&m) {
                assert!(full.starts_with(&storage), "{} appeared on the host", full.display());
            }
        }
        if let Ok(rest) = cfg.data_dir.strip_prefix("/tmp") {
            assert!(storage.join("tmp").join(rest).join(&m).exists());
        }
    };

    // ---- F2 -------------------------------------------------------------
    attack_f2_host_secrets_ssh_shadow_aws_config_db_and_other_workspaces_are_unreadable => |kind| {
        let e = engine(kind);
        let cfg = config();
        // A home directory on the host with keys and cloud credentials.
        let home = OwnedDir(PathBuf::from("/root").join(token("f2-home")));
        let ssh_ed = Canary::new(home.0.join(".ssh/id_ed25519"), "ssh-ed25519");
        let ssh_rsa = Canary::new(home.0.join(".ssh/id_rsa"), "ssh-rsa");
        let aws = Canary::new(home.0.join(".aws/credentials"), "aws");
        let gcloud = Canary::new(home.0.join(".config/gcloud/credentials.db"), "gcloud");
        // moat's own configuration and database under its data directory.
        let t = token("f2");
        let conf = Canary::new(cfg.data_dir.join(format!("{t}.toml")), "config");
        let db = Canary::new(cfg.data_dir.join(format!("{t}.db")), "db");
        // Another conversation's workspace.
        let mut other = e.lease(policy(kind), LeaseOptions::default()).unwrap();
        let other_secret = token("other-workspace");
        assert_eq!(sh(&mut other, &format!("echo {other_secret} > secret.txt && echo {other_secret} > ~/.netrc && echo ok")).stdout, "ok\n");
        let other_ws = other.workspace_dir();
        let other_storage = other.storage_dir();
        let snap = HostSnapshot::take(&[&ssh_ed.path, &ssh_rsa.path, &aws.path, &gcloud.path, &conf.path, &db.path]);

        let mut l = e.lease(policy(kind), LeaseOptions::default()).unwrap();
        let host_only: Vec<String> = std::fs::read_dir("/").unwrap().flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !["bin", "dev", "etc", "home", "lib", "lib32", "lib64", "libx32", "proc", "run", "sbin", "sys", "tmp", "usr"].contains(&n.as_str()))
            .collect();
        assert!(host_only.iter().any(|n| n == "root"), "{host_only:?}");
        let secrets = [&ssh_ed, &ssh_rsa, &aws, &gcloud, &conf, &db];
        let code = PRELUDE.to_string() + r##"
import glob, json
P = json.loads(sys.argv[1])
for name, path in P["paths"].items():
    attempt("read_" + name, lambda path=path: read(path))
attempt("list_root_ssh", lambda: os.listdir("/root/.ssh"))
print("root_ssh_keys", len(glob.glob("/root/.ssh/id_*")))
attempt("list_data_dir", lambda: os.listdir(P["data"]))
attempt("list_leases", lambda: os.listdir(P["leases"]))
attempt("list_other_storage", lambda: os.listdir(P["other_storage"]))
visible = [n for n in P["host_only"] if os.path.lexists("/" + n)]
print("host_only_visible", ",".join(visible) or "none")
# Nothing readable anywhere outside /usr, /proc and /dev holds a secret.
found = []
count = 0
for top in ["/etc", "/home", "/tmp", "/workspace", "/run", "/"]:
    for root, dirs, files in os.walk(top):
        if top == "/":
            dirs[:] = []
        for f in files:
            p = os.path.join(root, f)
            try:
                data = read(p)
            except OSError:
                continue
            count += 1
            for s in P["secrets"]:
                if s.encode() in data:
                    found.append(p)
print("scanned_enough", "yes" if count > 20 else count)
print("found", ",".join(found) or "none")
"##;
        let mut paths = BTreeMap::new();
        paths.insert("ssh_ed25519", ssh_ed.path.clone());
        paths.insert("ssh_rsa", ssh_rsa.path.clone());
        paths.insert("aws_credentials", aws.path.clone());
        paths.insert("gcloud", gcloud.path.clone());
        paths.insert("moat_config", conf.path.clone());
        paths.insert("moat_db", db.path.clone());
        paths.insert("etc_shadow", "/etc/shadow".into());
        paths.insert("etc_gshadow", "/etc/gshadow".into());
        paths.insert("etc_sudoers", "/etc/sudoers".into());
        paths.insert("etc_ssh_host_key", "/etc/ssh/ssh_host_ed25519_key".into());
        paths.insert("root_ssh_ed25519", "/root/.ssh/id_ed25519".into());
        paths.insert("root_ssh_rsa", "/root/.ssh/id_rsa".into());
        paths.insert("root_aws", "/root/.aws/credentials".into());
        paths.insert("own_home_aws", "/home/agent/.aws/credentials".into());
        paths.insert("proc_root_shadow", "/proc/1/root/etc/shadow".into());
        paths.insert("other_workspace", other_ws.join("secret.txt"));
        paths.insert("other_home_netrc", other_storage.join("home/.netrc"));
        let mut all_secrets: Vec<String> = secrets.iter().map(|c| c.content.clone()).collect();
        all_secrets.push(other_secret.clone());
        let arg = serde_json::json!({
            "paths": paths,
            "data": cfg.data_dir,
            "leases": e.leases_dir(),
            "other_storage": other_storage,
            "host_only": host_only,
            "secrets": all_secrets,
        });
        let o = run(&mut l, RunSpec::new(["/usr/bin/python3".to_string(), "-c".into(), code, arg.to_string()]));
        // /proc/1/root: EACCES under bwrap, where PID 1 is not dumpable (K9).
        let mut expected: Vec<(String, &str)> = paths.keys().map(|k| (format!("read_{k}"), if *k == "proc_root_shadow" { "ENOENT|EACCES" } else { "ENOENT" })).collect();
        expected.extend([
            ("list_root_ssh".to_string(), "ENOENT"),
            ("root_ssh_keys".to_string(), "0"),
            ("list_data_dir".to_string(), "ENOENT"),
            ("list_leases".to_string(), "ENOENT"),
            ("list_other_storage".to_string(), "ENOENT"),
            ("host_only_visible".to_string(), "none"),
            ("scanned_enough".to_string(), "yes"),
            ("found".to_string(), "none"),
        ]);
        let exp: Vec<(&str, &str)> = expected.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        expect_all(&o, &exp);
        // The other lease's files are intact and still its own.
        assert_eq!(sh(&mut other, "cat secret.txt").stdout, format!("{other_secret}\n"));
        snap.assert_unchanged();
    };

    // ---- F3 -------------------------------------------------------------
    attack_f3_symlinks_inside_lead_nowhere_outside => |kind| {
        let (_e, mut l) = lease(kind);
        let snap = HostSnapshot::take(&[]);
        let canary = snap.canary_paths()[0].clone();
        // The literal examples, with the shell's own tools.
        let o = sh(&mut l, &format!(r##"
ln -s /etc/shadow x && cat x 2>&1; echo "cat_x=$?"
ln -s / r && cat r/root/.ssh/id_rsa r/etc/shadow 2>&1; echo "cat_r=$?"
ln -s {canary} c && cat c 2>&1; echo "cat_canary=$?"
ln -s ../../../../../../../../etc/shadow up && cat up 2>&1; echo "cat_up=$?"
ln -s loop loop && cat loop 2>&1; echo "cat_loop=$?"
"##, canary = canary.display()));
        let want = "cat: x: No such file or directory\ncat_x=1\ncat: r/root/.ssh/id_rsa: No such file or directory\ncat: r/etc/shadow: No such file or directory\ncat_r=1\ncat: c: No such file or directory\ncat_canary=1\ncat: up: No such file or directory\ncat_up=1\ncat: loop: Too many levels of symbolic links\ncat_loop=1\n";
        // This gVisor resolves every path below a symlink to / as / itself
        // (`r/etc/shadow` is the root directory): still nothing of the host.
        let want = if kind == BackendKind::Gvisor {
            want.replace("r/root/.ssh/id_rsa: No such file or directory", "r/root/.ssh/id_rsa: Is a directory")
                .replace("r/etc/shadow: No such file or directory", "r/etc/shadow: Is a directory")
        } else {
            want.to_string()
        };
        assert_eq!(o.stdout, want, "stderr: {}", o.stderr);
        // Listings through links, and the /proc magic links.
        let code = PRELUDE.to_string() + r##"
try:
    print("r_root_is", "sandbox_root" if sorted(os.listdir("r/root")) == sorted(os.listdir("/")) else "something")
except FileNotFoundError:
    print("r_root_is", "missing")
print("r_is_sandbox_root", "yes" if sorted(os.listdir("r")) == sorted(os.listdir("/")) else "no")
os.symlink("/proc/1/root", "pr")
attempt("proc_root_shadow", lambda: read("pr/etc/shadow"))
attempt("proc_root_root", lambda: os.listdir("pr/root"))
os.symlink("/proc/self/root/../../../../root", "sr")
attempt("self_root_up", lambda: os.listdir("sr/"))
os.symlink("/proc/self/cwd/../../../../../etc/shadow", "cw")
attempt("cwd_up_shadow", lambda: read("cw"))
"##;
        let o = py(&mut l, &code);
        // Neither backend lets the agent through /proc/1/root at all (EACCES):
        // under bwrap PID 1 is not dumpable (K9).
        let proc_root = if kind == BackendKind::Bwrap { "EACCES" } else { "ENOENT|EACCES" };
        expect_all(&o, &[
            ("r_root_is", if kind == BackendKind::Bwrap { "missing" } else { "missing|sandbox_root" }),
            ("r_is_sandbox_root", "yes"),
            ("proc_root_shadow", proc_root),
            ("proc_root_root", proc_root),
            ("self_root_up", "ENOENT"),
            ("cwd_up_shadow", "ENOENT"),
        ]);
        snap.assert_unchanged();
    };

    attack_f3_symlinks_left_in_the_workspace_never_make_the_host_read_outside => |kind| {
        let (_e, mut l) = lease(kind);
        let outside = scratch_dir("f3-outside");
        let secret = Canary::new(outside.0.join("secret.txt"), "f3-secret");
        let o = sh(&mut l, &format!(r##"
set -e
echo report > report.txt
mkdir -p out/logs && echo log > out/logs/run.log
ln -s {secret} artifact.txt
ln -s {dir} outdir
ln -s ../../../../../../../../../../{secret_rel} relative.txt
ln -s /etc/shadow shadow.txt
mkdir -p deep && ln -s {dir} deep/link
ln -s report.txt inner.txt
ln -s /proc/self/root proc_root
mkfifo fifo
echo planted
"##, secret = secret.path.display(), dir = outside.0.display(),
            secret_rel = secret.path.strip_prefix("/").unwrap().display()));
        assert_eq!(o.stdout, "planted\n", "{}", o.stderr);
        let ws = l.workspace_dir();
        let open = |rel: &str| -> std::io::Result<String> {
            let mut s = String::new();
            open_in_workspace(&ws, Path::new(rel))?.read_to_string(&mut s)?;
            Ok(s)
        };
        // What the agent produced on purpose is readable.
        assert_eq!(open("report.txt").unwrap(), "report\n");
        assert_eq!(open("out/logs/run.log").unwrap(), "log\n");
        // The attack is real: a naive host read follows the link out.
        assert_eq!(std::fs::read_to_string(ws.join("artifact.txt")).unwrap(), secret.content);
        assert_eq!(std::fs::read_to_string(ws.join("outdir/secret.txt")).unwrap(), secret.content);
        // The host's way of reading refuses every symlink, wherever it sits.
        for rel in ["artifact.txt", "outdir/secret.txt", "relative.txt", "shadow.txt", "deep/link/secret.txt", "inner.txt", "proc_root/etc/passwd"] {
            let err = open(rel).unwrap_err();
            assert!(matches!(err.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)), "{rel}: {err}");
        }
        // Paths that leave the workspace by name are refused before any open.
        for rel in ["../../../../etc/passwd", "out/../../secret.txt", "/etc/passwd"] {
            let err = open(rel).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{rel}: {err}");
        }
        // A FIFO is refused at once instead of blocking the host forever.
        let (tx, rx) = std::sync::mpsc::channel();
        let ws2 = ws.clone();
        std::thread::spawn(move || {
            let _ = tx.send(open_in_workspace(&ws2, Path::new("fifo")).map(|_| ()).map_err(|e| e.kind()));
        });
        let got = rx.recv_timeout(Duration::from_secs(5)).expect("opening a FIFO blocked the host");
        // Under gVisor a FIFO lives in the sentry and never reaches the host.
        let fifo_on_host = std::fs::symlink_metadata(ws.join("fifo")).is_ok();
        assert!(fifo_on_host || kind == BackendKind::Gvisor, "the FIFO is missing on the host");
        let want = if fifo_on_host { std::io::ErrorKind::InvalidInput } else { std::io::ErrorKind::NotFound };
        assert_eq!(got, Err(want));
    };

    attack_f3_symlink_swap_race_never_makes_the_host_read_outside => |kind| {
        let (_e, mut l) = lease(kind);
        let outside = scratch_dir("f3-race");
        let secret = Canary::new(outside.0.join("secret.txt"), "f3-race");
        // The agent swaps `swap` between a file and a symlink out, for as long
        // as the host keeps reading (the command runs alongside, in a thread).
        let ws = l.workspace_dir();
        let stop_file = ws.join("stop");
        let script = format!(r##"
import os
while not os.path.exists("stop"):
    os.symlink("{secret}", "tmp_l"); os.rename("tmp_l", "swap")
    with open("tmp_f", "w") as f: f.write("benign")
    os.rename("tmp_f", "swap")
print("swapped")
"##, secret = secret.path.display());
        let (o, (benign, refused, naive_leaks)) = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let (mut benign, mut refused, mut naive_leaks) = (0, 0, 0);
                assert!(wait_until(Duration::from_secs(20), || ws.join("swap").symlink_metadata().is_ok()), "the swapper did not start");
                let start = std::time::Instant::now();
                while start.elapsed() < Duration::from_secs(20) && (benign < 200 || refused < 200 || naive_leaks < 5) {
                    let mut s = String::new();
                    match open_in_workspace(&ws, Path::new("swap")).and_then(|mut f| f.read_to_string(&mut s)) {
                        Ok(_) => {
                            assert_ne!(s, secret.content, "the host read the secret through a swapped symlink");
                            benign += 1;
                        }
                        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => refused += 1,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => panic!("unexpected error {e}"),
                    }
                    if std::fs::read_to_string(ws.join("swap")).is_ok_and(|s| s == secret.content) {
                        naive_leaks += 1;
                    }
                }
                std::fs::write(&stop_file, "").unwrap();
                (benign, refused, naive_leaks)
            });
            let o = run(&mut l, RunSpec { timeout: Some(Duration::from_secs(60)), ..RunSpec::new(["/usr/bin/python3".to_string(), "-c".into(), script]) });
            (o, reader.join().unwrap())
        });
        assert_eq!(o.stdout, "swapped\n", "{}", o.stderr);
        assert!(benign > 0 && refused > 0, "the race did not run (benign {benign}, refused {refused})");
        assert!(naive_leaks > 0, "the race never reached the secret through a naive read; the test proves nothing");
        l.stop();
    };

    // ---- F4 -------------------------------------------------------------
    attack_f4_hard_links_and_device_nodes_fail => |kind| {
        let e = engine(kind);
        // Two workspaces: the lease's own, and a host directory on the same
        // filesystem as the host's /etc and /usr.
        let host_ws = scratch_dir("f4-ws");
        chown_tree(&host_ws.0, 4242);
        let snap = HostSnapshot::take(&[]);
        for ws in [WorkspaceSource::Fresh, WorkspaceSource::Host(host_ws.0.clone())] {
            let mut l = e.lease(policy(kind), LeaseOptions { workspace: ws.clone(), ..Default::default() }).unwrap();
            let code = PRELUDE.to_string() + r##"
attempt("link_etc_passwd", lambda: os.link("/etc/passwd", "p"))
attempt("link_etc_hosts", lambda: os.link("/etc/hosts", "h"))
attempt("link_usr_bin_su", lambda: os.link("/usr/bin/su", "su"))
attempt("link_usr_bin_passwd", lambda: os.link("/usr/bin/passwd", "pw"))
attempt("link_moat_init", lambda: os.link("/run/moat/init", "init"))
attempt("link_tmp_to_workspace", lambda: (write("/tmp/t"), os.link("/tmp/t", "t")))
attempt("mknod_null", lambda: os.mknod("n", stat.S_IFCHR | 0o666, os.makedev(1, 3)))
attempt("mknod_mem", lambda: os.mknod("mem", stat.S_IFCHR | 0o666, os.makedev(1, 1)))
attempt("mknod_block", lambda: os.mknod("vda", stat.S_IFBLK | 0o666, os.makedev(254, 0)))
attempt("mknod_in_tmp", lambda: os.mknod("/tmp/n", stat.S_IFCHR | 0o666, os.makedev(1, 3)))
attempt("mknod_in_home", lambda: os.mknod("/home/agent/n", stat.S_IFCHR | 0o666, os.makedev(1, 3)))
attempt("mknod_fifo", lambda: os.mknod("fifo", stat.S_IFIFO | 0o600))
attempt("link_own_file", lambda: (write("own"), os.link("own", "own2")))
"##;
            let o = py(&mut l, &code);
            expect_all(&o, &[
                ("link_etc_passwd", "EXDEV"),
                ("link_etc_hosts", "EXDEV"),
                ("link_usr_bin_su", "EXDEV"),
                ("link_usr_bin_passwd", "EXDEV"),
                ("link_moat_init", if kind == BackendKind::Bwrap { "EXDEV" } else { "EXDEV|ENOENT" }),
                ("link_tmp_to_workspace", "EXDEV"),
                ("mknod_null", "EPERM"),
                ("mknod_mem", "EPERM"),
                ("mknod_block", "EPERM"),
                ("mknod_in_tmp", "EPERM"),
                ("mknod_in_home", "EPERM"),
                // A FIFO is no device and stays in the sandbox: allowed.
                ("mknod_fifo", "OK"),
                // Hard links within the workspace are ordinary (the control).
                ("link_own_file", "OK"),
            ]);
            // The shell tools fail the same way.
            let o = sh(&mut l, "ln /etc/passwd p2; echo \"ln=$?\"; mknod null2 c 1 3; echo \"mknod=$?\"; cp -a /dev/null null3; echo \"cp=$?\"");
            assert_eq!(o.stdout, "ln=1\nmknod=1\ncp=1\n");
            assert!(o.stderr.contains("Invalid cross-device link"), "{}", o.stderr);
            assert!(o.stderr.contains("mknod: null2: Operation not permitted"), "{}", o.stderr);
            assert!(o.stderr.contains("cp: cannot create special file 'null3': Operation not permitted"), "{}", o.stderr);
            // On the host: no device node, no second name of a host file.
            let ws_dir = l.workspace_dir();
            let host_inodes: Vec<(u64, u64)> = ["/etc/passwd", "/etc/hosts", "/usr/bin/su", "/usr/bin/passwd"]
                .iter()
                .map(|p| std::fs::metadata(p).unwrap())
                .map(|m| (m.dev(), m.ino()))
                .collect();
            for rel in walk(&ws_dir) {
                let m = std::fs::symlink_metadata(ws_dir.join(&rel)).unwrap();
                let ft = m.file_type();
                assert!(!ft.is_char_device() && !ft.is_block_device(), "device node {} on the host", rel.display());
                assert!(!host_inodes.contains(&(m.dev(), m.ino())), "{} is a host file", rel.display());
            }
            l.destroy().unwrap();
        }
        snap.assert_unchanged();
    };

    // ---- F5 -------------------------------------------------------------
    attack_f5_protected_git_hooks_and_config_stay_read_only => |kind| {
        let e = engine(kind);
        let repo = scratch_dir("f5-repo");
        std::fs::create_dir_all(repo.0.join(".git/hooks")).unwrap();
        std::fs::create_dir_all(repo.0.join(".git/objects")).unwrap();
        std::fs::write(repo.0.join(".git/config"), "[core]\n\tbare = false\n").unwrap();
        std::fs::write(repo.0.join(".git/HEAD"), "ref: refs/heads/main\n").unwrap();
        std::fs::write(repo.0.join(".git/hooks/pre-commit"), "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::write(repo.0.join("main.rs"), "fn main() {}\n").unwrap();
        chown_tree(&repo.0, 4242);
        let git_before = tree_fingerprint(&repo.0.join(".git"));
        let snap = HostSnapshot::take(&[]);
        let mut l = e.lease(policy(kind), LeaseOptions { workspace: WorkspaceSource::Host(repo.0.clone()), ..Default::default() }).unwrap();
        let code = PRELUDE.to_string() + r##"
import shutil
attempt("config_write", lambda: write(".git/config", "[core]\n\thooksPath = /tmp\n"))
attempt("config_append", lambda: append(".git/config"))
attempt("config_truncate", lambda: os.truncate(".git/config", 0))
attempt("config_chmod", lambda: os.chmod(".git/config", 0o666))
attempt("config_unlink", lambda: os.unlink(".git/config"))
attempt("config_rename_away", lambda: os.rename(".git/config", ".git/config.old"))
attempt("config_rename_out", lambda: os.rename(".git/config", "config.old"))
attempt("config_rename_over", lambda: (write(".git/evil"), os.rename(".git/evil", ".git/config")))
attempt("config_rename_over_from_outside", lambda: (write("evil"), os.rename("evil", ".git/config")))
attempt("config_symlink_over", lambda: (os.symlink("/tmp/x", ".git/lnk"), os.rename(".git/lnk", ".git/config")))
attempt("config_hardlink", lambda: os.link(".git/config", "cfg"))
attempt("hook_write", lambda: write(".git/hooks/pre-commit", "#!/bin/sh\ncurl evil\n"))
attempt("hook_new", lambda: write(".git/hooks/post-checkout", "#!/bin/sh\ncurl evil\n"))
attempt("hook_chmod", lambda: os.chmod(".git/hooks/pre-commit", 0o777))
attempt("hook_unlink", lambda: os.unlink(".git/hooks/pre-commit"))
attempt("hooks_rename", lambda: os.rename(".git/hooks", ".git/hooks.old"))
attempt("hooks_rmtree", lambda: shutil.rmtree(".git/hooks"))
attempt("hooks_replace", lambda: (os.mkdir(".git/h2"), os.rename(".git/h2", ".git/hooks")))
attempt("hooks_replace_from_outside", lambda: (os.mkdir("h3"), os.rename("h3", ".git/hooks")))
# Moving the parent away would carry the read-only binds with it and let a
# fresh .git take its place.
attempt("git_rename", lambda: os.rename(".git", ".git-old"))
attempt("git_rmtree", lambda: shutil.rmtree(".git"))
attempt("git_replace", lambda: (os.mkdir("g2"), os.rename("g2", ".git")))
attempt("git_exchange", lambda: os.rename("/workspace", "/workspace2"))
# Ordinary files of the repository stay writable (the control).
attempt("source_write", lambda: append("main.rs"))
# Remove the attack's own scratch entries, so the host check below is exact.
for junk in [".git/evil", ".git/lnk", "evil", "lnk"]:
    attempt("cleanup " + junk, lambda junk=junk: os.unlink(junk))
for junk in [".git/h2", "h3", "g2"]:
    attempt("cleanup " + junk, lambda junk=junk: os.rmdir(junk))
"##;
        let o = py(&mut l, &code);
        expect_all(&o, &[
            ("config_write", "EROFS"),
            ("config_append", "EROFS"),
            ("config_truncate", "EROFS"),
            ("config_chmod", "EROFS"),
            ("config_unlink", "EBUSY"),
            ("config_rename_away", "EBUSY"),
            ("config_rename_out", "EXDEV|EBUSY"),
            ("config_rename_over", "EBUSY"),
            ("config_rename_over_from_outside", "EXDEV|EBUSY"),
            ("config_symlink_over", "EBUSY"),
            ("config_hardlink", "EXDEV"),
            ("hook_write", "EROFS"),
            ("hook_new", "EROFS"),
            ("hook_chmod", "EROFS"),
            ("hook_unlink", "EROFS"),
            ("hooks_rename", "EBUSY"),
            ("hooks_rmtree", "EROFS|EBUSY"),
            ("hooks_replace", "EBUSY"),
            ("hooks_replace_from_outside", "EXDEV|EBUSY"),
            ("git_rename", "EBUSY"),
            ("git_rmtree", "EROFS|EBUSY"),
            ("git_replace", "EBUSY"),
            ("git_exchange", "EBUSY|EROFS"),
            ("source_write", "OK"),
        ]);
        l.destroy().unwrap();
        let git_after = tree_fingerprint(&repo.0.join(".git"));
        assert_eq!(git_before.keys().collect::<Vec<_>>(), git_after.keys().collect::<Vec<_>>(), "entries of .git changed");
        for (p, f) in &git_before {
            if !p.starts_with("objects") {
                assert!(git_after[p] == *f, ".git/{} changed", p.display());
            }
        }
        assert_eq!(std::fs::read_to_string(repo.0.join(".git/config")).unwrap(), "[core]\n\tbare = false\n");
        assert_eq!(std::fs::read_to_string(repo.0.join("main.rs")).unwrap(), "fn main() {}\npwned");
        assert!(!repo.0.join(".git-old").exists());
        snap.assert_unchanged();
    };

    attack_f5_protected_paths_in_a_writable_extra_mount_stay_read_only => |kind| {
        let e = engine(kind);
        let root = scratch_dir("f5-mount");
        let repo = root.0.join("repo");
        std::fs::create_dir_all(repo.join("sub/.git/hooks")).unwrap();
        std::fs::write(repo.join("sub/.git/config"), "[core]\n").unwrap();
        std::fs::write(repo.join("sub/.git/hooks/pre-push"), "#!/bin/sh\n").unwrap();
        // The lease's uid is its own, not the directory owner's: open it to all.
        let st = std::process::Command::new("chmod").args(["-R", "a+rwX"]).arg(&repo).status().unwrap();
        assert!(st.success());
        let before = tree_fingerprint(&repo);
        let mut p = policy(kind);
        p.filesystem.allowed_roots = vec![root.0.clone()];
        p.filesystem.protected = vec!["sub/.git/hooks".into(), "sub/.git/config".into()];
        p.filesystem.mounts.push(MountRequest { host: repo.clone(), sandbox: "/src".into(), writable: true });
        let mut l = e.lease(p, LeaseOptions::default()).unwrap();
        let code = PRELUDE.to_string() + r##"
attempt("config_write", lambda: write("/src/sub/.git/config", "x"))
attempt("hook_new", lambda: write("/src/sub/.git/hooks/post-merge", "x"))
attempt("git_rename", lambda: os.rename("/src/sub/.git", "/src/sub/.git-old"))
attempt("sub_rename", lambda: os.rename("/src/sub", "/src/sub-old"))
attempt("mount_rename", lambda: os.rename("/src", "/src-old"))
attempt("other_write", lambda: (write("/src/note", "x"), os.unlink("/src/note")))
"##;
        let o = py(&mut l, &code);
        expect_all(&o, &[
            ("config_write", "EROFS"),
            ("hook_new", "EROFS"),
            ("git_rename", "EBUSY"),
            ("sub_rename", "EBUSY"),
            ("mount_rename", "EBUSY|EROFS"),
            ("other_write", "OK"),
        ]);
        l.destroy().unwrap();
        assert_eq!(tree_fingerprint(&repo), before);
    };

    attack_f5_protected_path_planted_as_symlink_refuses_the_start => |kind| {
        let e = engine(kind);
        let elsewhere = scratch_dir("f5-elsewhere");
        std::fs::create_dir_all(elsewhere.0.join("hooks")).unwrap();
        std::fs::write(elsewhere.0.join("config"), "[core]\n").unwrap();
        // Three plantings: the hooks dir, the config file, and .git itself.
        for (label, plant) in [
            ("hooks", &(|r: &Path, o: &Path| {
                std::fs::create_dir_all(r.join(".git")).unwrap();
                std::os::unix::fs::symlink(o.join("hooks"), r.join(".git/hooks")).unwrap();
            }) as &dyn Fn(&Path, &Path)),
            ("config", &|r: &Path, o: &Path| {
                std::fs::create_dir_all(r.join(".git")).unwrap();
                std::os::unix::fs::symlink(o.join("config"), r.join(".git/config")).unwrap();
            }),
            ("git", &|r: &Path, o: &Path| {
                std::os::unix::fs::symlink(o, r.join(".git")).unwrap();
            }),
        ] {
            let repo = scratch_dir("f5-planted");
            plant(&repo.0, &elsewhere.0);
            chown_tree(&repo.0, 4242);
            let mut l = e.lease(policy(kind), LeaseOptions { workspace: WorkspaceSource::Host(repo.0.clone()), ..Default::default() }).unwrap();
            let err = l.run(RunSpec::new(["true"]), &mut |_, _| {}).err().unwrap_or_else(|| panic!("{label}: the sandbox started"));
            let msg = err.to_string();
            assert!(matches!(err, SandboxError::Refused(_)), "{label}: {msg}");
            assert!(msg.contains("is a symlink or leads outside"), "{label}: {msg}");
            assert!(msg.contains(".git"), "{label}: {msg}");
            assert!(l.host_pids().is_empty(), "{label}: an instance runs");
        }
    };

    // ---- F6 -------------------------------------------------------------
    attack_f6_mount_allowlist_refuses_before_start => |kind| {
        let scratch_engine = scratch_dir("f6-data");
        let e = Engine::new(EngineConfig { data_dir: scratch_engine.0.join("data"), ..config() }, kind).unwrap();
        let base = scratch_dir("f6");
        let allowed = base.0.join("allowed");
        let outside = base.0.join("outside");
        std::fs::create_dir_all(allowed.join("project")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(allowed.join("project/README"), "project\n").unwrap();
        std::fs::write(outside.join("secret"), "outside\n").unwrap();
        std::os::unix::fs::symlink(&outside, allowed.join("innocent")).unwrap();
        std::os::unix::fs::symlink("../outside", allowed.join("relative")).unwrap();
        std::fs::create_dir_all(allowed.join(".aws")).unwrap();
        std::os::unix::fs::symlink(allowed.join(".aws"), allowed.join("cloud")).unwrap();
        let names = [".ssh", ".gnupg", ".aws", ".azure", ".gcloud", ".kube", ".docker", "credentials", ".env", ".netrc", ".npmrc", ".pypirc", "id_rsa", "id_ed25519", "private_key", ".secret"];
        for n in names {
            std::fs::create_dir_all(allowed.join(n)).unwrap();
            std::fs::create_dir_all(allowed.join("project").join(n).join("inner")).unwrap();
        }
        std::fs::create_dir_all(allowed.join(".ENV.local")).unwrap();
        std::fs::create_dir_all(allowed.join(".config/gcloud")).unwrap();
        let leases = e.leases_dir();
        let refuse = |host: PathBuf, sandbox: &str, want: &str| {
            let mut p = policy(kind);
            p.filesystem.allowed_roots = vec![allowed.clone()];
            // Straight into the policy: the sandbox crate must check on its own
            // whatever the policy crate let through.
            p.filesystem.mounts.push(MountRequest { host: host.clone(), sandbox: sandbox.into(), writable: true });
            let err = match e.lease(p, LeaseOptions::default()) {
                Ok(_) => panic!("mount {} -> {sandbox} was accepted", host.display()),
                Err(err) => err,
            };
            let msg = err.to_string();
            assert!(matches!(err, SandboxError::MountRefused { .. }), "{msg}");
            assert!(msg.contains(want), "mount {} -> {sandbox}: {msg:?} does not say {want:?}", host.display());
            assert!(msg.contains(&host.display().to_string()), "{msg}");
            assert!(mounts_with(&host.display().to_string()).is_empty(), "{} was mounted", host.display());
            assert!(mounts_with(&base.0.display().to_string()).is_empty());
            assert_eq!(std::fs::read_dir(&leases).unwrap().count(), 0, "a lease directory was created");
        };
        // Outside the allowed roots, directly or through a symlink.
        refuse(outside.clone(), "/data", "is outside the allowed roots");
        refuse(PathBuf::from("/etc"), "/data", "is outside the allowed roots");
        refuse(PathBuf::from("/root"), "/data", "is outside the allowed roots");
        refuse(allowed.join("innocent"), "/data", &format!("its real path {} is outside the allowed roots", outside.display()));
        refuse(allowed.join("relative"), "/data", "is outside the allowed roots");
        refuse(allowed.join("project/../../outside"), "/data", "is outside the allowed roots");
        refuse(allowed.join("missing"), "/data", "the host path cannot be resolved");
        // Every blocked name, at the end of the path and in the middle.
        for n in names {
            refuse(allowed.join(n), "/data", "matches the blocked pattern");
            refuse(allowed.join("project").join(n).join("inner"), "/data", "matches the blocked pattern");
        }
        refuse(allowed.join(".ENV.local"), "/data", "matches the blocked pattern \".env\"");
        refuse(allowed.join(".config/gcloud"), "/data", "matches the blocked pattern");
        // A harmless name whose real path is blocked.
        refuse(allowed.join("cloud"), "/data", "matches the blocked pattern \".aws\"");
        // Bad in-sandbox paths.
        for (inside, want) in [
            ("/data/../etc", "contains a '.' or '..' component"),
            ("/workspace/../../etc", "contains a '.' or '..' component"),
            ("/data/./x", "contains a '.' or '..' component"),
            ("data", "is not absolute"),
            ("/", "may not cover the sandbox's root"),
            ("/proc/1", "which moat reserves"),
            ("/dev/shm", "which moat reserves"),
            ("/run/moat/init", "which moat reserves"),
        ] {
            refuse(allowed.join("project"), inside, want);
        }
        // No allowed roots at all: nothing may be mounted.
        let mut p = policy(kind);
        p.filesystem.mounts.push(MountRequest { host: allowed.join("project"), sandbox: "/data".into(), writable: false });
        let msg = e.lease(p, LeaseOptions::default()).err().unwrap().to_string();
        assert!(msg.contains("no filesystem.allowed_roots are configured"), "{msg}");
        // The control: an allowed mount works, read-only unless asked.
        let mut p = policy(kind);
        p.filesystem.allowed_roots = vec![allowed.clone()];
        p.filesystem.mounts.push(MountRequest { host: allowed.join("project"), sandbox: "/data".into(), writable: false });
        let mut l = e.lease(p, LeaseOptions::default()).unwrap();
        let o = sh(&mut l, "cat /data/README; echo x > /data/new 2>/dev/null; echo \"write=$?\"");
        assert_eq!(o.stdout, "project\nwrite=2\n", "{}", o.stderr);
        assert!(!allowed.join("project/new").exists());
    };

    // ---- F7 -------------------------------------------------------------
    attack_f7_filling_the_disk_stops_at_the_quota => |kind| {
        let e = engine(kind);
        let mut p = policy(kind);
        p.limits.disk = ByteSize::mib(8);
        p.limits.memory = ByteSize::mib(8 + 128);
        let mut l = e.lease(p, LeaseOptions::default()).unwrap();
        let mut other = e.lease(policy(kind), LeaseOptions::default()).unwrap();
        let snap = HostSnapshot::take(&[]);
        let free_before = free_bytes(Path::new("/"));
        let code = PRELUDE.to_string() + r##"
def fill(tag, path, total):
    n = 0
    chunk = b"x" * (1 << 20)
    try:
        with open(path, "wb") as f:
            while n < total:
                f.write(chunk)
                f.flush()
                n += len(chunk)
        print(tag, "OK", n >> 20)
    except OSError as e:
        print(tag, errno.errorcode[e.errno], n >> 20)
# A first file in /tmp, so the big one hits the shared quota, not RLIMIT_FSIZE.
fill("tmp", "/tmp/first", 1 << 20)
fill("workspace", "/workspace/big", 512 << 20)
fill("home", "/home/agent/more", 512 << 20)
fill("dev_shm", "/dev/shm/more", 512 << 20)
attempt("dev_file", lambda: write("/dev/fill", "x" * (1 << 20)))
os.unlink("/workspace/big")
fill("again", "/workspace/again", 2 << 20)
# An inode flood stops at the lease's inode limit.
made = 0
try:
    os.mkdir("/tmp/many")
    while made < 100000:
        os.close(os.open("/tmp/many/%d" % made, os.O_CREAT | os.O_WRONLY, 0o600))
        made += 1
    print("inodes", "OK", made)
except OSError as e:
    print("inodes", errno.errorcode[e.errno], made)
"##;
        let o = py(&mut l, &code);
        let got = pairs(&o.stdout);
        let field = |k: &str| got.get(k).cloned().unwrap_or_else(|| panic!("no {k} in {}\n{}", o.stdout, o.stderr));
        assert_eq!(field("tmp"), "OK 1");
        // The big write stops at the 8 MiB quota with ENOSPC, having written
        // less than the quota.
        let big = field("workspace");
        let big: Vec<&str> = big.split(' ').collect();
        assert_eq!(big[0], "ENOSPC", "{}", o.stdout);
        assert!(big[1].parse::<u64>().unwrap() < 8, "{}", o.stdout);
        // The other writable places share the same quota: nothing is left.
        assert_eq!(field("home"), "ENOSPC 0", "{}", o.stdout);
        assert_eq!(field("dev_shm"), "ENOSPC 0", "/dev/shm is outside the quota: {}", o.stdout);
        let dev_file = field("dev_file");
        assert!(dev_file == "EROFS" || (kind == BackendKind::Gvisor && dev_file == "EACCES"), "{dev_file}");
        // Deleting frees the quota again.
        assert_eq!(field("again"), "OK 2", "{}", o.stdout);
        let inodes = field("inodes");
        let inodes: Vec<&str> = inodes.split(' ').collect();
        assert_eq!(inodes[0], "ENOSPC", "{}", o.stdout);
        assert!(inodes[1].parse::<u32>().unwrap() <= 2048, "{}", o.stdout);
        // The lease's storage is an 8 MiB filesystem of its own.
        assert_eq!(total_bytes(&l.storage_dir()), 8 << 20);
        // The host lost no disk space to it (other processes on this machine
        // may write meanwhile; the attack tried to write 1.5 GiB).
        let free_after = free_bytes(Path::new("/"));
        assert!(free_before.saturating_sub(free_after) < 64 << 20, "host free space fell by {} bytes", free_before - free_after);
        // Another lease is unaffected: it writes 16 MiB and reads it back.
        let o2 = sh(&mut other, "head -c 16777216 /dev/zero > big && wc -c < big");
        assert_eq!(o2.stdout, "16777216\n", "{}", o2.stderr);
        // The full lease still runs commands.
        assert_eq!(sh(&mut l, "echo alive").stdout, "alive\n");
        snap.assert_unchanged();
    };

    // ---- C3 -------------------------------------------------------------
    attack_c3_leases_cannot_read_write_or_signal_each_other => |kind| {
        let e = engine(kind);
        let mut a = e.lease(policy(kind), LeaseOptions::default()).unwrap();
        let mut b = e.lease(policy(kind), LeaseOptions::default()).unwrap();
        assert_ne!(a.host_uid(), b.host_uid());
        let secret = token("c3-secret");
        let marker = token("c3-daemon");
        let a_ws = a.workspace_dir();
        let a_storage = a.storage_dir();
        let a_leases = e.leases_dir();
        // A's request runs while B attacks: a process and a setsid'd child
        // that wait until the host releases them, then report they survived.
        let a_script = format!(r##"
echo {secret} > /workspace/secret.txt; echo {secret} > /tmp/t
exec python3 -c '
import os, time
def wait(p):
    while not os.path.exists(p): time.sleep(0.05)
if os.fork() == 0:
    os.setsid()
    wait("/workspace/release")
    open("/workspace/child", "w").write("child survived")
    os._exit(0)
open("/workspace/ready", "w").close()
wait("/workspace/release")
wait("/workspace/child")
time.sleep(0.1)
print("parent survived")
print(open("/workspace/child").read())
' {marker}
"##);
        let (a_out, o, host_pids) = std::thread::scope(|s| {
            let a_run = s.spawn(|| run(&mut a, RunSpec { timeout: Some(Duration::from_secs(60)), ..RunSpec::new(["/bin/sh", "-c", &a_script]) }));
            assert!(wait_until(Duration::from_secs(30), || a_ws.join("ready").exists()), "A's request did not start");
            let host_pids: Vec<u32> = procs_with(&marker).iter().map(|p| p.pid).collect();
            if kind == BackendKind::Bwrap {
                assert_eq!(host_pids.len(), 2, "A's processes are not visible on the host");
            }
        let code = PRELUDE.to_string() + r##"
import json, signal, glob
P = json.loads(sys.argv[1])
attempt("read_ws", lambda: read(P["ws"] + "/secret.txt"))
attempt("write_ws", lambda: write(P["ws"] + "/secret.txt", "overwritten"))
attempt("read_storage_tmp", lambda: read(P["storage"] + "/tmp/t"))
attempt("list_leases", lambda: os.listdir(P["leases"]))
for d in ["/var/lib/moat", "/var/lib/moat/leases", "/run/moat", "/tmp", "/workspace", "/home"]:
    for root, dirs, files in os.walk(d):
        for f in files:
            try:
                if P["secret"].encode() in read(os.path.join(root, f)):
                    print("found", os.path.join(root, f))
            except OSError:
                pass
mine = "/proc/%d/cmdline" % os.getpid()
seen = [p for p in glob.glob("/proc/[0-9]*/cmdline") if p != mine and P["marker"].encode() in read(p)]
print("proc_sees_daemon", len(seen))
for i, pid in enumerate(P["host_pids"]):
    attempt("kill_%d" % i, lambda pid=pid: os.kill(pid, 9))
# kill(-1) reaches every process B may signal: B's own child, nothing of A's.
import subprocess
child = subprocess.Popen(["sleep", "600"])
attempt("kill_all", lambda: os.kill(-1, 9))
print("own_child", child.wait())
"##;
        let arg = serde_json::json!({
            "ws": a_ws, "storage": a_storage, "leases": a_leases, "secret": secret,
            "marker": marker, "host_pids": host_pids,
        });
            let o = run(&mut b, RunSpec::new(["/usr/bin/python3".to_string(), "-c".into(), code, arg.to_string()]));
            std::fs::write(a_ws.join("release"), "").unwrap();
            (a_run.join().unwrap(), o, host_pids)
        });
        assert_eq!(o.code(), 0, "{}\n{}", o.stdout, o.stderr);
        let mut expected = vec![
            ("read_ws".to_string(), "ENOENT"),
            ("write_ws".to_string(), "ENOENT"),
            ("read_storage_tmp".to_string(), "ENOENT"),
            ("list_leases".to_string(), "ENOENT"),
            ("proc_sees_daemon".to_string(), "0"),
            ("kill_all".to_string(), "OK"),
            ("own_child".to_string(), "-9"),
        ];
        for i in 0..host_pids.len() {
            expected.push((format!("kill_{i}"), "ESRCH"));
        }
        let exp: Vec<(&str, &str)> = expected.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        expect_all(&o, &exp);
        assert!(!o.stdout.contains("found"), "{}", o.stdout);
        // A's processes survived everything B did; its files are unchanged.
        assert_eq!(a_out.outcome.termination, Termination::Exited(0), "{}", a_out.stderr);
        assert_eq!(a_out.stdout, "parent survived\nchild survived\n");
        assert_eq!(sh(&mut a, "cat /workspace/secret.txt /tmp/t").stdout, format!("{secret}\n{secret}\n"));
        assert_eq!(std::fs::read_to_string(a_ws.join("secret.txt")).unwrap(), format!("{secret}\n"));
        let ids = LeaseIds::of(&e, &a);
        a.destroy().unwrap();
        ids.assert_gone();
    };

    attack_c3_a_reset_lease_shows_nothing_of_the_previous_request => |kind| {
        let (_e, mut l) = lease(kind);
        let marker = token("c3-reset");
        let o = run(&mut l, RunSpec {
            env: vec![("PREVIOUS_REQUEST_SECRET".into(), marker.clone())],
            ..RunSpec::new(["/bin/sh", "-c", &format!(r##"
echo "$PREVIOUS_REQUEST_SECRET" > /workspace/left.txt
echo "export LEFT_BEHIND={marker}" >> ~/.profile
echo "export LEFT_BEHIND={marker}" >> ~/.bashrc
mkdir -p ~/.config && echo {marker} > ~/.config/state
echo {marker} > /tmp/left
echo {marker} > /dev/shm/left
setsid python3 -c 'import time; time.sleep(600)' {marker} >/dev/null 2>&1 &
nohup sh -c 'sleep 600; echo {marker}' >/dev/null 2>&1 &
echo done
"##)])
        });
        assert_eq!(o.stdout, "done\n", "{}", o.stderr);
        // Variables never outlive their command, even before a reset.
        assert!(!sh(&mut l, "env").stdout.contains(&marker));
        let uid = l.host_uid();
        l.reset().unwrap();
        let o = sh(&mut l, &format!(r##"
python3 -c 'import os; print([(d, sorted(os.listdir(d))) for d in ["/dev/shm", "/home/agent", "/tmp", "/workspace"]])'
grep -rl {marker} /workspace /home/agent /tmp /dev/shm 2>/dev/null
env | grep -c {marker}
bash -lc 'env' | grep -c {marker}
for p in /proc/[0-9]*; do tr '\0' ' ' < $p/cmdline; echo; done | grep -c -e '^python3 -c import time' -e '^sleep 600'
"##));
        // Four empty places, then three counts of zero.
        assert_eq!(o.stdout, "[('/dev/shm', []), ('/home/agent', []), ('/tmp', []), ('/workspace', [])]\n0\n0\n0\n", "{}", o.stderr);
        if kind == BackendKind::Bwrap {
            assert!(procs_with(&marker).is_empty());
            assert!(procs_of_uid(uid).iter().all(|p| !p.cmdline.contains("sleep")));
        }
    };
}

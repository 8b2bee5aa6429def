//! `moat sandbox run` and `moat doctor` as a user calls them: exit statuses,
//! the one-line `moat:` reasons, flag and policy errors, workspace binding.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output};

fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("moat-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o711)).unwrap();
    d
}

fn moat() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_moat"));
    let s = scratch();
    c.env("MOAT_DATA_DIR", s.join("data"))
        .env("MOAT_RUNTIME_DIR", s.join("run"))
        .env_remove("MOAT_ALLOW_UNSANDBOXED");
    c
}

fn run(args: &[&str]) -> Output {
    moat().args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn exit_status_is_the_commands_own_with_a_moat_reason() {
    let o = run(&["sandbox", "run", "--", "sh", "-c", "echo hi; exit 3"]);
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(stdout(&o), "hi\n");
    assert_eq!(stderr(&o).trim_end(), "moat: command exited with status 3");
    let o = run(&["sandbox", "run", "--", "true"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(stderr(&o), "");
}

#[test]
fn timeout_is_124() {
    let o = run(&[
        "sandbox",
        "run",
        "--timeout",
        "1s",
        "--",
        "sh",
        "-c",
        "setsid sleep 500 & sleep 501",
    ]);
    assert_eq!(o.status.code(), Some(124));
    assert_eq!(
        stderr(&o).trim_end(),
        "moat: time limit 1s reached, process tree killed"
    );
    let ps = Command::new("pgrep")
        .args(["-f", "sleep 50[01]"])
        .output()
        .unwrap();
    assert!(ps.stdout.is_empty(), "survivors: {}", stdout(&ps));
}

#[test]
fn memory_limit_is_137() {
    let o = run(&[
        "sandbox",
        "run",
        "--memory",
        "64MiB",
        "--",
        "python3",
        "-c",
        "x = bytearray(512 << 20)",
    ]);
    assert_eq!(o.status.code(), Some(137));
    assert_eq!(
        stderr(&o).trim_end(),
        "moat: memory limit 64 MiB reached, process tree killed"
    );
}

#[test]
fn a_signal_is_128_plus_n() {
    let o = run(&["sandbox", "run", "--", "sh", "-c", "kill -KILL $$"]);
    assert_eq!(o.status.code(), Some(137));
    assert_eq!(stderr(&o).trim_end(), "moat: command killed by SIGKILL");
}

#[test]
fn bad_flags_and_policies_are_125_and_name_the_problem() {
    let o = run(&["sandbox", "run", "--memory", "lots", "--", "true"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(
        stderr(&o).starts_with("moat: --memory: \"lots\" is not a size"),
        "{}",
        stderr(&o)
    );

    let o = run(&["sandbox", "run", "--env", "NOVALUE", "--", "true"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("--env"), "{}", stderr(&o));

    let dir = tempfile::tempdir().unwrap();
    let pol = dir.path().join("policy.toml");
    std::fs::write(&pol, "[limits]\npids = 2000000\n").unwrap();
    let o = run(&[
        "sandbox",
        "run",
        "--policy",
        pol.to_str().unwrap(),
        "--",
        "true",
    ]);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("limits.pids"), "{}", stderr(&o));

    std::fs::write(&pol, "[limits]\nmemory = 5\n").unwrap();
    let o = run(&[
        "sandbox",
        "run",
        "--policy",
        pol.to_str().unwrap(),
        "--",
        "true",
    ]);
    assert!(
        stderr(&o).contains("limits.memory") && stderr(&o).contains("line 2"),
        "{}",
        stderr(&o)
    );

    let o = run(&[
        "sandbox",
        "run",
        "--policy",
        "/nonexistent/policy.toml",
        "--",
        "true",
    ]);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("cannot read policy file /nonexistent/policy.toml"));
}

#[test]
fn bad_network_flags_are_125_and_name_the_flag() {
    for (flag, value, why) in [
        ("--allow-domain", "*", "leading '*.'"),
        ("--allow-domain", "*.com", "covers a whole top-level domain"),
        ("--allow-domain", "", "is not a valid host name"),
        ("--allow-domain", "host.test:0", "bad port"),
        ("--allow-domain", "host.test:99999", "bad port"),
        ("--allow-domain", "host.test:http", "bad port"),
        ("--allow-domain", "héllo.test", "punycode"),
        ("--allow-domain", "2130706433", "non-standard form"),
        ("--allow-domain", "0x7f000001", "non-standard form"),
        ("--allow-domain", "[::1", "unclosed '['"),
        ("--allow-domain", "[not-v6]", "is not an IPv6 address"),
        (
            "--allow-domain",
            "a*.b.test",
            "wildcards match whole subdomains only",
        ),
        ("--allow-domain", "http://a.test/", "bad port"),
        ("--resolve", "git.test", "is not HOST=IP"),
        ("--resolve", "git.test=nowhere", "is not an IP address"),
        ("--resolve", "git.test=2130706433", "is not an IP address"),
        ("--resolve", "git.test=10.0.0.300", "is not an IP address"),
        (
            "--resolve",
            "bad host=127.0.0.1",
            "is not a valid host name",
        ),
        ("--resolve", "=127.0.0.1", "is not a valid host name"),
    ] {
        let o = run(&["sandbox", "run", flag, value, "--", "true"]);
        assert_eq!(
            o.status.code(),
            Some(125),
            "{flag} {value:?}: {}",
            stderr(&o)
        );
        let err = stderr(&o);
        assert!(
            err.starts_with(&format!("moat: {flag}: ")) && err.contains(why),
            "{flag} {value:?}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    // Good values pass (and the pin alone allows nothing).
    let o = run(&[
        "sandbox",
        "run",
        "--allow-domain",
        "*.Example.Test.",
        "--allow-domain",
        "[::1]:8080",
        "--resolve",
        "api.example.test=[::1]",
        "--",
        "true",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn mounts_outside_allowed_roots_are_refused_before_start() {
    let o = run(&["sandbox", "run", "--mount", "/etc:/hostetc", "--", "true"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("allowed_roots"), "{}", stderr(&o));
    let o = run(&["sandbox", "run", "--mount", "/root/.ssh:/k", "--", "true"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(
        stderr(&o).contains("blocked pattern \".ssh\""),
        "{}",
        stderr(&o)
    );
}

#[test]
fn workspace_dir_is_bound_read_write() {
    let root = scratch().join("ws");
    std::fs::create_dir_all(&root).unwrap();
    std::os::unix::fs::chown(&root, Some(4242), Some(4242)).unwrap();
    std::fs::write(root.join("in.txt"), "input").unwrap();
    let o = run(&[
        "sandbox",
        "run",
        "--workspace",
        root.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "cat in.txt; echo out > out.txt",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "input");
    assert_eq!(
        std::fs::read_to_string(root.join("out.txt")).unwrap(),
        "out\n"
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(root.join("out.txt")).unwrap().uid(), 4242);
}

#[test]
fn a_root_owned_workspace_is_refused() {
    let root = scratch().join("rootws");
    std::fs::create_dir_all(&root).unwrap();
    let o = run(&[
        "sandbox",
        "run",
        "--workspace",
        root.to_str().unwrap(),
        "--",
        "true",
    ]);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("owned by root"), "{}", stderr(&o));
}

/// A directory of the test's own whose parent only root may enter (mode
/// 0700), as `/root` is: (the closed parent, a path below it).
fn under_a_closed_parent(name: &str, below: &str) -> (PathBuf, PathBuf) {
    let parent = scratch().join(name).join("closed");
    std::fs::create_dir_all(&parent).unwrap();
    std::fs::set_permissions(scratch().join(name), std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o700)).unwrap();
    (parent.clone(), parent.join(below))
}

#[test]
fn a_data_dir_under_a_closed_parent_works() {
    let (parent, data) = under_a_closed_parent("closed-data", "moat");
    for backend in ["bwrap", "gvisor"] {
        let o = moat()
            .env("MOAT_DATA_DIR", &data)
            .args(["sandbox", "run", "--backend", backend, "--", "sh", "-c"])
            .arg("echo kept > /workspace/f && cat /workspace/f && id -u")
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "{backend}: {}", stderr(&o));
        assert_eq!(stdout(&o), "kept\n1000\n", "{backend}");
    }
    // moat changed nothing about the parent to get there.
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&parent).unwrap().mode() & 0o7777, 0o700);
    // The data directory is there; the lease's files were not in it.
    assert!(data.is_dir());
    assert!(!data.join("leases").exists());
}

#[test]
fn a_workspace_its_owner_cannot_reach_is_refused_naming_the_directory_in_the_way() {
    let (parent, ws) = under_a_closed_parent("closed-ws", "ws");
    std::fs::create_dir_all(&ws).unwrap();
    std::fs::write(ws.join("in.txt"), "input").unwrap();
    for p in [&ws, &ws.join("in.txt")] {
        std::os::unix::fs::chown(p, Some(4243), Some(4243)).unwrap();
    }
    let args = [
        "sandbox",
        "run",
        "--workspace",
        ws.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "cat in.txt; echo out > out.txt",
    ];
    for backend in ["bwrap", "gvisor"] {
        let o = moat()
            .args(["sandbox", "run", "--backend", backend])
            .args(&args[2..])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(125), "{backend}: {}", stderr(&o));
        let err = stderr(&o);
        let fix = format!("chmod o+x {}", parent.display());
        assert!(
            err.contains(&format!("--workspace {}", ws.display())) && err.contains(&fix),
            "{backend}: {err}"
        );
        assert!(!err.contains("Can't find source path"), "{err}");
    }
    // Nothing ran: the workspace is as it was.
    assert!(!ws.join("out.txt").exists());
    // The fix the message names works.
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o711)).unwrap();
    let o = run(&args);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "input");
    assert_eq!(
        std::fs::read_to_string(ws.join("out.txt")).unwrap(),
        "out\n"
    );
}

#[test]
fn a_runtime_dir_the_sandboxes_cannot_reach_is_refused_naming_the_setting() {
    let (parent, run_dir) = under_a_closed_parent("closed-run", "run");
    let o = moat()
        .env("MOAT_RUNTIME_DIR", &run_dir)
        .args(["sandbox", "run", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("MOAT_RUNTIME_DIR")
            && err.contains(&format!("chmod o+x {}", parent.display())),
        "{err}"
    );
    assert!(
        !run_dir.exists(),
        "nothing was created under the closed parent"
    );
}

/// A dead lease where moat kept leases before they moved to the runtime
/// directory (`<data>/leases`) is cleaned up like one in the new place.
#[test]
fn a_dead_lease_in_the_old_place_under_the_data_dir_is_swept() {
    let s = scratch().join("legacy");
    let lease = s.join("data").join("leases").join("tmp-00000000000000aa");
    let g1 = lease.join("g1");
    std::fs::create_dir_all(&g1).unwrap();
    std::fs::write(lease.join("uid"), "1000000042").unwrap();
    std::fs::write(lease.join("lock"), "").unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "moat-lease"])
        .arg(&g1)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mounting the old lease's tmpfs");
    let mounted = || {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(g1.to_str().unwrap())
    };
    assert!(mounted());
    let o = moat()
        .env("MOAT_DATA_DIR", s.join("data"))
        .args(["sandbox", "run", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!mounted(), "the old lease's tmpfs is still mounted");
    assert!(!lease.exists(), "the old lease's directory is still there");
}

#[test]
fn no_network_and_no_host_environment_inside() {
    let o = moat()
        .env("MOAT_TEST_SECRET_TOKEN", "sk-do-not-leak")
        .args([
            "sandbox",
            "run",
            "--env",
            "VISIBLE=yes",
            "--",
            "sh",
            "-c",
            "env; tail -n +3 /proc/net/dev | cut -d: -f1",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    let out = stdout(&o);
    assert!(!out.contains("sk-do-not-leak"));
    assert!(out.contains("VISIBLE=yes"));
    let ifaces: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with(' '))
        .map(str::trim)
        .collect();
    assert_eq!(ifaces, vec!["lo"]);
}

#[test]
fn local_backend_needs_opt_in_and_warns() {
    let o = run(&["sandbox", "run", "--backend", "local", "--", "true"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(
        stderr(&o).contains("MOAT_ALLOW_UNSANDBOXED=1"),
        "{}",
        stderr(&o)
    );
    let o = moat()
        .env("MOAT_ALLOW_UNSANDBOXED", "1")
        .args([
            "sandbox",
            "run",
            "--backend",
            "local",
            "--",
            "sh",
            "-c",
            "echo ran",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(stdout(&o), "ran\n");
    assert!(stderr(&o).contains("NO sandbox"), "{}", stderr(&o));
}

#[test]
fn missing_command_is_a_usage_error() {
    let o = run(&["sandbox", "run"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("CMD"), "{}", stderr(&o));
}

#[test]
fn doctor_reports_each_check() {
    let o = run(&["doctor"]);
    let out = stdout(&o);
    for name in [
        "bubblewrap",
        "user namespaces",
        "seccomp",
        "cgroups",
        "runsc",
    ] {
        assert!(out.contains(name), "doctor did not check {name}: {out}");
    }
    assert_eq!(o.status.code(), Some(0), "{out}");
}

#[test]
fn a_killed_moat_leaves_nothing_after_the_next_start() {
    // A data directory of its own, so other tests' live leases are not in the way.
    let s = scratch().join("killed");
    std::fs::create_dir_all(&s).unwrap();
    std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o711)).unwrap();
    let own = || {
        let mut c = moat();
        c.env("MOAT_DATA_DIR", s.join("data"));
        c
    };
    let leases = moat_sandbox::leases_dir(&moat_sandbox::EngineConfig {
        data_dir: s.join("data"),
        runtime_dir: scratch().join("run"),
        init_path: PathBuf::new(),
    });
    let mut child = own()
        .args([
            "sandbox",
            "run",
            "--",
            "sh",
            "-c",
            "setsid sleep 777 & exec sleep 778",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the sandbox runs.
    let running = || {
        let o = Command::new("pgrep")
            .args(["-f", "sleep 77[78]"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).lines().count()
    };
    let start = std::time::Instant::now();
    while running() < 2 {
        assert!(start.elapsed().as_secs() < 20, "sandbox did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mine: Vec<String> = std::fs::read_dir(&leases)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("tmp-"))
        .collect();
    assert!(!mine.is_empty());
    child.kill().unwrap(); // SIGKILL: moat gets no chance to clean up
    child.wait().unwrap();
    // The sandbox dies with moat (parent-death signal, then PID 1 of its namespace).
    let start = std::time::Instant::now();
    while running() > 0 {
        assert!(
            start.elapsed().as_secs() < 10,
            "sandbox processes survived moat"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The next moat start sweeps the dead lease: files, mount and cgroups.
    let o = own()
        .args(["sandbox", "run", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for id in &mine {
        assert!(!leases.join(id).exists(), "lease {id} left behind");
        assert!(
            !mountinfo.contains(id.as_str()),
            "mount of {id} left behind"
        );
        let mut bases = vec![PathBuf::from("/sys/fs/cgroup/moat")];
        for h in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
            bases.push(h.path().join("moat"));
        }
        for base in bases {
            if let Ok(rd) = std::fs::read_dir(&base) {
                for e in rd.flatten() {
                    assert!(
                        !e.file_name().to_string_lossy().ends_with(id.as_str()),
                        "cgroup {} left behind",
                        e.path().display()
                    );
                }
            }
        }
    }
}

#[test]
fn a_memory_kill_of_a_child_is_reported_as_the_limit_and_kills_the_tree() {
    // The shell survives its child's OOM kill and exits on its own; the run must
    // still say the memory limit fired, and the background sleeper must be gone.
    let o = run(&[
        "sandbox",
        "run",
        "--memory",
        "64MiB",
        "--",
        "sh",
        "-c",
        "setsid sleep 611 & python3 -c 'x = bytearray(512 << 20)'; echo after",
    ]);
    assert_eq!(o.status.code(), Some(137), "{}", stderr(&o));
    assert_eq!(
        stderr(&o).lines().last().unwrap_or(""),
        "moat: memory limit 64 MiB reached, process tree killed"
    );
    let ps = Command::new("pgrep")
        .args(["-f", "sleep 611"])
        .output()
        .unwrap();
    assert!(ps.stdout.is_empty(), "survivor: {}", stdout(&ps));
}

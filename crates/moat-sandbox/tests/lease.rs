//! Lease behaviour on every backend: commands, streams, exit statuses, limits,
//! reset, keeping files, templates.

mod common;

use common::*;
use moat_policy::BackendKind;
use moat_sandbox::{LeaseOptions, RunSpec, StdinSource, Termination, WorkspaceSource};

per_backend! {
    runs_a_command_and_streams_both_outputs => |kind| {
        let (_e, mut l) = lease(kind);
        let o = sh(&mut l, "echo out; echo err >&2; exit 3");
        assert_eq!(o.stdout, "out\n");
        assert_eq!(o.stderr, "err\n");
        assert_eq!(o.code(), 3);
        assert_eq!(o.outcome.reason().unwrap(), "moat: command exited with status 3");
    };
    many_commands_share_one_lease => |kind| {
        let (_e, mut l) = lease(kind);
        assert_eq!(sh(&mut l, "echo one > f; pwd").stdout, "/workspace\n");
        assert_eq!(sh(&mut l, "cat f").stdout, "one\n");
        let o = run(&mut l, RunSpec { stdin: StdinSource::Bytes(b"piped".to_vec()), ..RunSpec::new(["cat"]) });
        assert_eq!(o.stdout, "piped");
    };
    a_missing_program_is_127 => |kind| {
        let (_e, mut l) = lease(kind);
        let o = run(&mut l, RunSpec::new(["no-such-program-xyz"]));
        assert_eq!(o.code(), 127, "{:?}", o.outcome);
        assert!(o.outcome.reason().unwrap().starts_with("moat: cannot run"));
    };
    a_signal_is_128_plus_n => |kind| {
        let (_e, mut l) = lease(kind);
        let o = sh(&mut l, "kill -TERM $$");
        assert_eq!(o.code(), 143);
        assert!(o.outcome.reason().unwrap().contains("SIGTERM"));
    };
    the_environment_is_only_the_policys => |kind| {
        std::env::set_var("MOAT_TEST_HOST_SECRET", "hunter2");
        let e = engine(kind);
        let mut p = policy(kind);
        p.env.insert("GREETING".into(), "hi".into());
        let mut l = e.lease(p, LeaseOptions::default()).unwrap();
        let o = sh(&mut l, "env | sort");
        let names: Vec<&str> = o.stdout.lines().map(|l| l.split('=').next().unwrap()).collect();
        for n in &names {
            assert!(["GREETING", "HOME", "LANG", "PATH", "PWD", "SHLVL", "TERM", "USER", "_", "OLDPWD"].contains(n), "unexpected variable {n}");
        }
        assert!(o.stdout.contains("GREETING=hi"));
        assert!(o.stdout.contains("HOME=/home/agent"));
        assert!(!o.stdout.contains("hunter2"));
    };
    timeout_is_124_and_kills_daemons => |kind| {
        let (_e, mut l) = lease(kind);
        // A tag unique to this process, so other programs never match: the
        // last argument of each daemon (the pattern matches neither grep nor
        // the shell running it). Each daemon beats a heartbeat file in the
        // workspace; the count of the sandbox's processes carrying the tag is
        // read inside the sandbox (gVisor's processes are not host processes).
        let tag = format!("hb{}{}", std::process::id(), kind.name());
        let count = format!("for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done | grep -c '[ ]{tag} $'");
        // The count sees a process that is there.
        let seen = sh(&mut l, &format!("sh -c 'sleep 5' {tag} & p=$!; sleep 0.3; {count}; kill $p"));
        assert_eq!(seen.stdout, "1\n", "the process count does not see processes: {}", seen.stderr);
        let beat = |n: u32| format!("sh -c 'i=0; while :; do i=$((i+1)); echo $i > /workspace/beat{n}; sleep 0.1; done' {tag}");
        let script = format!("setsid {} & nohup {} >/dev/null 2>&1 & ({} &) ; sleep 303", beat(1), beat(2), beat(3));
        let o = run(&mut l, RunSpec {
            timeout: Some(std::time::Duration::from_millis(1500)),
            ..RunSpec::new(["/bin/sh", "-c", script.as_str()])
        });
        assert_eq!(o.code(), 124);
        assert_eq!(o.outcome.termination, Termination::TimedOut(std::time::Duration::from_millis(1500)));
        assert_eq!(o.outcome.reason().unwrap(), "moat: time limit 1500ms reached, process tree killed");
        // The heartbeats ran, and stopped: none moves within a second.
        let beats = sh(&mut l, &format!("cat beat1 beat2 beat3; sleep 1; cat beat1 beat2 beat3; {count}"));
        let lines: Vec<u32> = beats.stdout.lines().map(|v| v.parse().unwrap_or_else(|_| panic!("{}\n{}", beats.stdout, beats.stderr))).collect();
        assert_eq!(lines.len(), 7, "{}\n{}", beats.stdout, beats.stderr);
        assert!(lines[..3].iter().all(|n| *n >= 3), "a daemon never ran: {lines:?}");
        assert_eq!(lines[..3], lines[3..6], "a daemon survived the time limit (its heartbeat moved)");
        assert_eq!(lines[6], 0, "processes of the timed-out command survived");
        if kind == BackendKind::Bwrap {
            let left = std::process::Command::new("pgrep").args(["-f", &format!(" {tag}$")]).output().unwrap();
            assert!(left.stdout.is_empty(), "processes survived: {}", String::from_utf8_lossy(&left.stdout));
        }
        // The lease still works afterwards, with its files.
        assert_eq!(sh(&mut l, "echo again").stdout, "again\n");
    };
    reset_gives_clean_state => |kind| {
        let (_e, mut l) = lease(kind);
        // Files in the workspace, home and /tmp (dot files too), by globbing
        // (ls fails under this gVisor), and the sandbox's `sleep 400`s.
        let look = "for d in /workspace ~ /tmp; do for f in \"$d\"/* \"$d\"/.[!.]* \"$d\"/..?*; do if [ -e \"$f\" ] || [ -L \"$f\" ]; then echo \"$f\"; fi; done; done; \
                    echo procs=$(for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done | grep -c '^sleep 400')";
        let before = sh(&mut l, &format!("echo secret > /workspace/a; echo h > ~/b; echo t > /tmp/.c; (setsid sleep 400 &); sleep 0.3; {look}"));
        assert_eq!(before.stdout, "/workspace/a\n/home/agent/b\n/tmp/.c\nprocs=1\n", "the look does not see what is there: {}", before.stderr);
        l.reset().unwrap();
        let o = sh(&mut l, look);
        assert_eq!(o.stdout, "procs=0\n", "files or processes survived reset: {}", o.stderr);
    };
    named_leases_keep_files_until_destroyed => |kind| {
        let e = engine(kind);
        let name = format!("conv-{}-{}", kind.name(), std::process::id());
        let mut l = e.lease(policy(kind), LeaseOptions { name: Some(name.clone()), ..Default::default() }).unwrap();
        sh(&mut l, "echo kept > note");
        l.release().unwrap();
        let mut l = e.lease(policy(kind), LeaseOptions { name: Some(name.clone()), ..Default::default() }).unwrap();
        assert_eq!(sh(&mut l, "cat note").stdout, "kept\n");
        let dir = e.leases_dir().join(&name);
        l.destroy().unwrap();
        assert!(!dir.exists());
    };
    templates_are_copied_into_new_leases => |kind| {
        let e = engine(kind);
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("README"), "from template").unwrap();
        let mut l = e.lease(policy(kind), LeaseOptions { workspace: WorkspaceSource::Template(t.path().into()), ..Default::default() }).unwrap();
        assert_eq!(sh(&mut l, "cat README; echo x >> README").stdout, "from template");
        l.reset().unwrap();
        assert_eq!(sh(&mut l, "cat README").stdout, "from template");
        assert_eq!(std::fs::read_to_string(t.path().join("README")).unwrap(), "from template");
    };
    a_lease_outlives_the_thread_that_started_it => |kind| {
        // The sandbox's parent-death signal must follow moat, not the thread
        // that first ran a command (a pool warmer, a short-lived task).
        let (_e, mut l) = lease(kind);
        std::thread::scope(|s| {
            s.spawn(|| assert_eq!(sh(&mut l, "echo first").stdout, "first\n"));
        });
        std::thread::sleep(std::time::Duration::from_millis(300));
        let o = l.run(RunSpec::new(["echo", "second"]), &mut |_, _| {});
        assert_eq!(o.expect("the sandbox died with the thread").termination, Termination::Exited(0));
    };
    output_limit_kills_the_tree => |kind| {
        let e = engine(kind);
        let mut p = policy(kind);
        p.limits.output = moat_policy::ByteSize(64 * 1024);
        let mut l = e.lease(p, LeaseOptions::default()).unwrap();
        let o = sh(&mut l, "yes");
        assert_eq!(o.code(), 137);
        assert_eq!(o.outcome.stdout_bytes, 64 * 1024);
        assert!(o.outcome.reason().unwrap().contains("output limit 64 KiB"));
    };
}

#[test]
fn local_backend_needs_an_explicit_opt_in() {
    let e = engine(BackendKind::Local);
    std::env::remove_var("MOAT_ALLOW_UNSANDBOXED");
    let err = e
        .lease(policy(BackendKind::Local), LeaseOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("MOAT_ALLOW_UNSANDBOXED=1"), "{err}");
    let mut p = policy(BackendKind::Local);
    p.allow_unsandboxed = true;
    let mut l = e.lease(p, LeaseOptions::default()).unwrap();
    let o = sh(&mut l, "echo local; pwd");
    assert!(o.stdout.starts_with("local\n"));
    assert_eq!(o.code(), 0);
}

//! What a sandbox leaves in, or finds in, a host directory it was given
//! (docs/threat-model.md F8 and N9): git repositories it creates or edits
//! cannot make the owner's `git` run a program, `.git` links cannot lead host
//! git outside, and a host service's unix socket inside the directory cannot
//! be reached from the sandbox. Each test runs on bwrap and gVisor against a
//! real host workspace and checks the host afterwards.

mod common;

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::host::*;
use common::*;
use moat_policy::MountRequest;
use moat_sandbox::{LeaseOptions, RunSpec, WorkspaceSource};

/// Host git as the owner would run it, with the marker command's output kept.
fn git(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new("git")
        .args(["-c", "safe.directory=*", "-C"])
        .arg(dir)
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .unwrap()
}

fn host_repo(label: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(label)
        .tempdir_in(scratch())
        .unwrap();
    let repo = dir.path();
    assert!(git(repo, &["init", "-q"]).status.success());
    std::fs::write(repo.join("README"), "hello\n").unwrap();
    Command::new("chown")
        .args(["-R", "4546:4546"])
        .arg(repo)
        .status()
        .unwrap();
    dir
}

/// Every file named `pwned*` under `dir`: a marker a planted command wrote.
fn markers(dir: &Path) -> Vec<String> {
    let out = Command::new("find")
        .arg(dir)
        .args(["-name", "pwned*"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect()
}

// Inside the sandbox: repositories of the agent's own, each configured to run
// `touch pwned-<how>` when the owner next uses git there.
const PLANT: &str = r#"
set -e
run() { "$@" >/dev/null 2>&1; }
# A nested repository, deep down, with core.fsmonitor.
mkdir -p a/b/c/nested && cd a/b/c/nested && run git init -q && git config core.fsmonitor 'touch pwned-fsmonitor; false' && cd /workspace
# The same key, spelled as git also reads it.
mkdir -p spelled && cd spelled && run git init -q && printf '[Core]\n\tFSMonitor = "touch pwned-spelled; false"\n' >> .git/config && cd /workspace
# include.path to a file of the agent's.
mkdir -p inc && cd inc && run git init -q && printf '[core]\n\tfsmonitor = touch pwned-include; false\n' > ../evil.inc && git config include.path ../../evil.inc && cd /workspace
# A submodule's git directory under the top-level .git/modules.
mkdir -p .git/modules/sub sub && cd .git/modules/sub && run git init -q --bare && git config core.bare false && git config core.worktree ../../../sub && git config core.fsmonitor 'touch pwned-submodule; false' && cd /workspace && echo 'gitdir: ../.git/modules/sub' > sub/.git
# A hook in a nested repository, and core.hooksPath pointing at the agent's.
mkdir -p hooked && cd hooked && run git init -q && printf '#!/bin/sh\ntouch pwned-hook\n' > .git/hooks/pre-commit && chmod +x .git/hooks/pre-commit && cd /workspace
mkdir -p hp/h && printf '#!/bin/sh\ntouch pwned-hookspath\n' > hp/h/pre-commit && chmod +x hp/h/pre-commit && cd hp && run git init -q && git config core.hooksPath h && cd /workspace
# diff.external and a clean filter.
mkdir -p dx && cd dx && run git init -q && git config diff.external 'sh -c "touch pwned-diff"' && echo x > f && run git add f && run git -c user.name=a -c user.email=a@b commit -qm x && echo y > f && cd /workspace
# A .git file that sends host git to a directory outside the workspace.
mkdir -p away && echo 'gitdir: /tmp/moat-test-elsewhere/.git' > away/.git
echo planted
"#;

per_backend! {
    attack_f8_repositories_the_sandbox_leaves_run_nothing_on_the_host => |kind| {
        let dir = host_repo("f8-git");
        let repo = dir.path();
        let top_config = fingerprint(&repo.join(".git/config"));
        let e = engine(kind);
        let mut l = e
            .lease(policy(kind), LeaseOptions { workspace: WorkspaceSource::Host(repo.to_path_buf()), ..Default::default() })
            .unwrap();
        let o = run(&mut l, RunSpec::new(["/bin/sh", "-c", PLANT]));
        assert_eq!(o.stdout, "planted\n", "the plant must work inside: {}", o.stderr);
        // Already after that command, the sandbox itself sees the rewritten file
        // (the walk went through its view, so the two agree).
        let o = sh(&mut l, "cat a/b/c/nested/.git/config; test -e away/.git || echo away-gone");
        assert!(o.stdout.contains("Rewritten by moat") && !o.stdout.contains("fsmonitor"), "{o:?}");
        assert!(o.stdout.contains("away-gone"), "{o:?}");
        l.stop();
        let findings: Vec<String> = l.take_findings().iter().map(|f| f.to_string()).collect();
        l.destroy().unwrap();
        // The owner now uses git everywhere the agent left a repository.
        for d in ["a/b/c/nested", "spelled", "inc", "sub", "hooked", "hp", "dx", "away"] {
            git(&repo.join(d), &["status", "--porcelain"]);
            git(&repo.join(d), &["diff"]);
        }
        for d in ["hooked", "hp"] {
            std::fs::write(repo.join(d).join("x"), "x").unwrap();
            git(&repo.join(d), &["add", "x"]);
            git(&repo.join(d), &["-c", "user.name=o", "-c", "user.email=o@h", "commit", "-qm", "owner"]);
        }
        assert_eq!(markers(repo), Vec::<String>::new(), "host git ran a program the sandbox planted");
        // Each change was reported (for the user and the audit trail).
        for what in ["a/b/c/nested/.git/config", "spelled/.git/config", "inc/.git/config", ".git/modules/sub/config", "hooked/.git/hooks/pre-commit", "hp/.git/config", "dx/.git/config", "away/.git"] {
            assert!(findings.iter().any(|f| f.starts_with(what)), "no finding for {what}: {findings:#?}");
        }
        // No configuration the sandbox wrote holds a program-running key.
        for cfg in ["a/b/c/nested/.git/config", "spelled/.git/config", "inc/.git/config", ".git/modules/sub/config", "hp/.git/config", "dx/.git/config"] {
            let l = git(repo, &["config", "--file", cfg, "--list"]);
            let text = String::from_utf8_lossy(&l.stdout).to_lowercase();
            for key in ["fsmonitor", "hookspath", "include.path", "external", "worktree"] {
                assert!(!text.contains(key), "{cfg} still has {key}: {text}");
            }
        }
        // What is not dangerous survives: the nested repositories still work.
        assert!(git(&repo.join("dx"), &["log", "--oneline"]).status.success());
        // The host's own repository is unchanged.
        assert_eq!(top_config, fingerprint(&repo.join(".git/config")));
        assert!(git(repo, &["status", "--porcelain"]).status.success());
    };

    attack_f8_a_kept_per_thread_workspace_is_handed_back_too => |kind| {
        // A named lease (the gateway's per-thread sandbox) keeps its files
        // between turns; an operator may run git in them on the host.
        let e = engine(kind);
        let name = token("f8-kept");
        let mut l = e
            .lease(policy(kind), LeaseOptions { name: Some(name), ..Default::default() })
            .unwrap();
        let o = sh(&mut l, "mkdir -p repo && cd repo && git init -q && git config core.fsmonitor 'touch pwned-kept; false' && mkdir -p ~/h && cd ~/h && git init -q && git config core.pager 'touch pwned-home' && echo planted");
        assert_eq!(o.stdout, "planted\n", "{o:?}");
        let ws = l.workspace_dir();
        let home = l.home_dir();
        git(&ws.join("repo"), &["status", "--porcelain"]);
        assert_eq!(markers(&ws), Vec::<String>::new(), "host git ran the kept workspace's program");
        let cfg = std::fs::read_to_string(home.join("h/.git/config")).unwrap();
        assert!(!cfg.contains("pager"), "{cfg}");
        l.destroy().unwrap();
    };

    attack_f8_setuid_and_device_nodes_do_not_survive_hand_back => |kind| {
        let dir = host_repo("f8-modes");
        let repo = dir.path();
        let e = engine(kind);
        let mut l = e
            .lease(policy(kind), LeaseOptions { workspace: WorkspaceSource::Host(repo.to_path_buf()), ..Default::default() })
            .unwrap();
        // However the mode bits were tried (refused by seccomp, stripped by
        // gVisor, or set), none is on the host afterwards.
        let o = py(&mut l, "import os\nfor n in ('a','b'):\n    open(n,'w').close()\nfor f,m in (('a',0o4755),('b',0o2755)):\n    try: os.chmod(f,m)\n    except OSError as e: print('refused', f, e.errno)\nos.mkdir('d')\ntry: os.chmod('d',0o2775)\nexcept OSError as e: print('refused d', e.errno)\nprint('done')");
        assert!(o.stdout.contains("done"), "{o:?}");
        l.destroy().unwrap();
        for n in ["a", "b", "d"] {
            let m = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(repo.join(n)).unwrap().permissions());
            assert_eq!(m & 0o6000, 0, "{n} kept setuid/setgid: {m:o}");
        }
    };

    attack_n9_a_host_socket_inside_the_workspace_is_unreachable => |kind| {
        let dir = host_repo("n9-sock");
        let ws = dir.path();
        let hits = Arc::new(AtomicUsize::new(0));
        // A host service's socket, open to everyone (mode 0777): only moat
        // stands between the sandbox and it.
        let listen = |path: &Path, hits: Arc<AtomicUsize>| {
            let l = UnixListener::bind(path).unwrap();
            std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
            std::thread::spawn(move || {
                for mut c in l.incoming().flatten() {
                    hits.fetch_add(1, Ordering::SeqCst);
                    let mut b = [0u8; 64];
                    let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
                    let _ = c.read(&mut b);
                }
            });
        };
        listen(&ws.join("dev.sock"), hits.clone());
        // And one in a read-only mount of another host directory.
        let other = scratch_dir("n9-ro");
        Command::new("chown").args(["4546:4546"]).arg(&other.0).status().unwrap();
        listen(&other.0.join("ro.sock"), hits.clone());
        let mut p = policy(kind);
        p.filesystem.allowed_roots = vec![other.0.clone()];
        p.filesystem.mounts.push(MountRequest { host: other.0.clone(), sandbox: "/data".into(), writable: false });
        let e = engine(kind);
        let mut l = e
            .lease(p, LeaseOptions { workspace: WorkspaceSource::Host(ws.to_path_buf()), ..Default::default() })
            .unwrap();
        const TRY: &str = "import socket,sys\nfor p in sys.argv[1:]:\n    s=socket.socket(socket.AF_UNIX)\n    try:\n        s.connect(p); s.send(b'hello'); print('CONNECTED', p)\n    except OSError as e: print('refused', p, e.errno)\n";
        let o = run(&mut l, RunSpec::new(["python3", "-c", TRY, "/workspace/dev.sock", "/data/ro.sock"]));
        assert_eq!(o.stdout.matches("refused").count(), 2, "{o:?}");
        // A socket the host service creates while the lease lives.
        listen(&ws.join("late.sock"), hits.clone());
        let o = run(&mut l, RunSpec::new(["python3", "-c", TRY, "/workspace/late.sock"]));
        assert!(o.stdout.contains("refused"), "{o:?}");
        // The sandbox's own sockets in the workspace still work inside.
        let o = py(&mut l, "import socket,os\ns=socket.socket(socket.AF_UNIX); s.bind('/workspace/own.sock'); s.listen(1)\nc=socket.socket(socket.AF_UNIX); c.connect('/workspace/own.sock'); print('own ok')");
        assert!(o.stdout.contains("own ok"), "{o:?}");
        // Files still read and write through to the host directory.
        let o = sh(&mut l, "echo written > /workspace/out.txt && cat /workspace/README");
        assert_eq!(o.stdout, "hello\n", "{o:?}");
        let id = l.id().to_string();
        l.destroy().unwrap();
        assert_eq!(mounts_with(&id), Vec::<String>::new(), "a view of the lease is still mounted");
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(hits.load(Ordering::SeqCst), 0, "a host socket accepted a connection from the sandbox");
        assert_eq!(std::fs::read_to_string(ws.join("out.txt")).unwrap(), "written\n");
        let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(ws.join("out.txt")).unwrap());
        assert_eq!(owner, 4546, "a written file must stay the owner's");
        // No overlay mount or work directory is left behind.
        assert_eq!(mounts_with(&ws.to_string_lossy()), Vec::<String>::new());
        let parent = ws.parent().unwrap();
        let left: Vec<_> = std::fs::read_dir(parent).unwrap().flatten()
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.starts_with(&format!(".{}.moat-overlay", ws.file_name().unwrap().to_string_lossy()))
            })
            .collect();
        assert!(left.is_empty(), "work directories left: {left:?}");
    };
}

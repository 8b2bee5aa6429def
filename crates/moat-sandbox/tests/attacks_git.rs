//! F5 (variant): a sandbox with a host repository read-write cannot make the
//! host's `git` obey a config of its own through a planted `.git/commondir`.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use moat_sandbox::{LeaseOptions, RunSpec, WorkspaceSource};

fn git(dir: &Path, args: &[&str]) -> std::process::Output {
    // As the owner would run it (the repository belongs to the sandbox uid here).
    Command::new("git")
        .args(["-c", "safe.directory=*", "-C"])
        .arg(dir)
        .args(args)
        .output()
        .unwrap()
}

// The agent points commondir at a directory of its own whose config makes
// `git status` run a command (core.fsmonitor). It writes the host's paths
// (`$1`: the repository as the host sees it), so that the host's git would
// follow them if the plant stayed.
const PLANT: &str = r#"
mkdir -p evil
printf '[core]\n\trepositoryformatversion = 0\n\tfsmonitor = "touch %s/pwned-by-host-git; false"\n' "$1" > evil/config
mkdir -p evil/refs evil/objects
echo "$1/evil" > .git/commondir && echo planted
"#;

per_backend! {
    attack_f5_a_planted_git_commondir_is_removed => |kind| {
        let dir = tempfile::tempdir_in(scratch()).unwrap();
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o711)).unwrap();
        let repo = dir.path().join("repo");
        let repo = repo.as_path();
        std::fs::create_dir(repo).unwrap();
        assert!(git(repo, &["init", "-q"]).status.success());
        std::fs::write(repo.join("f"), "x").unwrap();
        Command::new("chown").args(["-R", "4545:4545"]).arg(repo).status().unwrap();
        let config_before = fingerprint(&repo.join(".git/config"));
        let host_path = repo.to_str().unwrap();
        let pwned = repo.join("pwned-by-host-git");
        let e = engine(kind);
        let mut l = e
            .lease(policy(kind), LeaseOptions { workspace: WorkspaceSource::Host(repo.to_path_buf()), ..Default::default() })
            .unwrap();
        let o = run(&mut l, RunSpec::new(["/bin/sh", "-c", PLANT, "plant", host_path]));
        assert_eq!(o.stdout, "planted\n", "the plant itself must work inside: {}", o.stderr);
        // Right after the command, the host repository has no commondir again.
        assert!(std::fs::symlink_metadata(repo.join(".git/commondir")).is_err(), "commondir survived the command");
        // A symlink planted the same way is removed too (not followed).
        let o = sh(&mut l, &format!("ln -s {host_path}/evil .git/commondir && echo planted"));
        assert_eq!(o.stdout, "planted\n");
        assert!(std::fs::symlink_metadata(repo.join(".git/commondir")).is_err(), "commondir symlink survived");
        assert!(repo.join("evil/config").exists(), "the target was not touched");
        l.destroy().unwrap();
        // Host git in the repository obeys only the repository's own config.
        let st = git(repo, &["status", "--porcelain"]);
        assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
        assert!(!pwned.exists(), "host git ran the sandbox's command");
        assert_eq!(config_before, fingerprint(&repo.join(".git/config")));
        // Control: the same commondir, left in a repository, does make the
        // host's git run the command (so the check above can fail).
        let control = dir.path().join("control");
        std::fs::create_dir(&control).unwrap();
        assert!(git(&control, &["init", "-q"]).status.success());
        std::fs::write(control.join(".git/commondir"), format!("{host_path}/evil\n")).unwrap();
        let _ = git(&control, &["status", "--porcelain"]);
        assert!(pwned.exists(), "the planted config is not obeyed even when left in place: the check proves nothing");
    };
}

//! F6 (variant): secret-looking entries *inside* a mounted host directory or a
//! host workspace are hidden from the sandbox, while the rest stays visible,
//! and the host's files are unchanged.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;
use moat_policy::MountRequest;
use moat_sandbox::{LeaseOptions, WorkspaceSource};

const SECRETS: [(&str, &str); 4] = [
    ("app/.env", "sk-live-canary-1"),
    ("app/.env.local", "sk-live-canary-2"),
    ("app/config/credentials", "canary-3"),
    ("app/.ssh/id_ed25519", "canary-4"),
];

fn tree(root: &Path) {
    for d in ["app/.ssh", "app/config", "app/node_modules/pkg"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("app/README"), "public").unwrap();
    for (p, content) in SECRETS {
        std::fs::write(root.join(p), content).unwrap();
    }
    // A symlink named like a secret resolves inside the sandbox: not masked, harmless.
    std::os::unix::fs::symlink("README", root.join("app/.netrc")).unwrap();
    for d in [
        "",
        "app",
        "app/.ssh",
        "app/config",
        "app/node_modules",
        "app/node_modules/pkg",
    ] {
        std::fs::set_permissions(root.join(d), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

fn check(o: &Output, base: &str) {
    assert!(o.stdout.contains("README=public"), "{}", o.stdout);
    for (p, content) in SECRETS {
        assert!(!o.stdout.contains(content), "{p} leaked: {}", o.stdout);
    }
    assert!(o.stdout.contains("ssh-dir-empty=yes"), "{}", o.stdout);
    assert!(
        o.stdout.contains("env-write=denied"),
        "{base}: {}",
        o.stdout
    );
}

const SCRIPT: &str = r#"
cd "$1"
echo "README=$(cat app/README)"
for f in app/.env app/.env.local app/config/credentials app/.ssh/id_ed25519; do echo "$f=[$(cat $f 2>&1)]"; done
[ -z "$(python3 -c 'import os; print(os.listdir("app/.ssh"))' | tr -d '[]')" ] && echo ssh-dir-empty=yes
(echo overwrite > app/.env) 2>/dev/null && echo env-write=allowed || echo env-write=denied
"#;

per_backend! {
    attack_f6_secret_names_inside_a_mount_are_hidden => |kind| {
        let dir = tempfile::tempdir_in(scratch()).unwrap();
        tree(dir.path());
        let before: Vec<_> = SECRETS.iter().map(|(p, _)| fingerprint(&dir.path().join(p))).collect();
        let e = engine(kind);
        let mut p = policy(kind);
        p.filesystem.allowed_roots.push(dir.path().to_path_buf());
        p.add_mount(MountRequest { host: dir.path().join("app"), sandbox: "/data/app".into(), writable: false }, "test").unwrap();
        let mut l = e.lease(p, LeaseOptions::default()).unwrap();
        let o = run(&mut l, moat_sandbox::RunSpec::new(["/bin/sh", "-c", SCRIPT, "sh", "/data"]));
        check(&o, "ro mount");
        let after: Vec<_> = SECRETS.iter().map(|(p, _)| fingerprint(&dir.path().join(p))).collect();
        assert_eq!(before, after, "host files changed");
    };
    attack_f6_secret_names_inside_a_host_workspace_are_hidden => |kind| {
        let dir = tempfile::tempdir_in(scratch()).unwrap();
        tree(dir.path());
        std::process::Command::new("chown").args(["-R", "4343:4343"]).arg(dir.path()).status().unwrap();
        let before: Vec<_> = SECRETS.iter().map(|(p, _)| fingerprint(&dir.path().join(p))).collect();
        let e = engine(kind);
        let mut l = e
            .lease(policy(kind), LeaseOptions { workspace: WorkspaceSource::Host(dir.path().to_path_buf()), ..Default::default() })
            .unwrap();
        let o = run(&mut l, moat_sandbox::RunSpec::new(["/bin/sh", "-c", SCRIPT, "sh", "/workspace"]));
        check(&o, "workspace");
        // The rest of the workspace stays writable.
        assert_eq!(sh(&mut l, "echo ok > app/new && cat app/new").stdout, "ok\n");
        let after: Vec<_> = SECRETS.iter().map(|(p, _)| fingerprint(&dir.path().join(p))).collect();
        assert_eq!(before, after, "host files changed");
    };
}

//! Channels on a root filesystem image (`image = "NAME"`, docs/images.md)
//! end to end through the web chat, on both backends: the shell agent runs
//! each message as a command in a sandbox whose system directories are the
//! image's; a channel naming a missing image stops `serve` naming the key.

mod gwkit;

#[path = "../../moat-sandbox/tests/common/rootfs.rs"]
mod rootfs;

use gwkit::*;
use moat_sandbox::image;

fn config(backend: &str, image: &str) -> String {
    web_config(
        1,
        "",
        &format!(
            "users = [\"*\"]\ndebounce = \"0ms\"\nbackend = \"{backend}\"\nimage = \"{image}\""
        ),
    )
}

fn run(c: &Client, thread: &str, cmd: &str) -> String {
    run_nth(c, thread, cmd, 1)
}

/// Runs `cmd` as the `n`th turn of `thread` (the stream replays earlier answers).
fn run_nth(c: &Client, thread: &str, cmd: &str, n: usize) -> String {
    let r = c.post(thread, cmd);
    assert_eq!(r.status, 202, "{r:?}");
    let mut sse = c.events(thread).expect("the event stream");
    let evs = sse.answers(n);
    answers_of(&evs).pop().expect("an answer").0
}

#[test]
fn a_channel_on_a_missing_image_stops_the_gateway_naming_the_key() {
    let err = match Gw::try_start_with("img-missing", &config("bwrap", "absent"), Vec::new()) {
        Ok(gw) => {
            gw.stop();
            panic!("the gateway started on a missing image");
        }
        Err(e) => e,
    };
    assert!(
        err.contains("channel[0].image") && err.contains("absent"),
        "{err}"
    );
}

fn on_an_image(backend: &str) {
    let data = fresh_dir(&format!("img-{backend}")).join("data");
    let src = rootfs::make(&fresh_dir("img-src").join("root"));
    image::import(&data, &scratch().join("run"), "dev", &src).expect("import");
    let gw = Gw::try_start_in(data, &config(backend, "dev"), Vec::new()).expect("started");
    let c = gw.client(None);
    let out = run(
        &c,
        "t1",
        "cat /usr/share/marker /etc/os-release; ls /usr/bin/python3 2>&1 || echo no-python",
    );
    assert!(out.contains("from the image"), "{out}");
    assert!(out.contains("ID=moat-test-image"), "{out}");
    assert!(
        out.contains("no-python"),
        "the host's /usr is visible: {out}"
    );
    gw.stop();
}

#[test]
fn bwrap_a_channel_with_an_image_runs_its_turns_in_it() {
    on_an_image("bwrap");
}

#[test]
fn gvisor_a_channel_with_an_image_runs_its_turns_in_it() {
    if std::process::Command::new("runsc")
        .arg("--version")
        .output()
        .is_err()
    {
        return;
    }
    on_an_image("gvisor");
}

#[test]
fn bwrap_a_root_inside_channel_writes_its_system_layer_and_the_pool_resets_it() {
    let data = fresh_dir("img-root").join("data");
    let src = rootfs::make(&fresh_dir("img-root-src").join("root"));
    image::import(&data, &scratch().join("run"), "dev", &src).expect("import");
    let cfg = format!("{}root_inside = true\n", config("bwrap", "dev"));
    let gw = Gw::try_start_in(data.clone(), &cfg, Vec::new()).expect("started");
    let c = gw.client(None);
    let out = run(
        &c,
        "t1",
        "id -u; echo mine > /usr/bin/mine && echo wrote; cat /usr/bin/mine",
    );
    assert!(
        out.starts_with("0\n") && out.contains("wrote\nmine"),
        "{out}"
    );
    // The next turn gets a reset sandbox: the layer is gone, the image intact.
    let out = run(&c, "t2", "cat /usr/bin/mine 2>&1 || echo gone; id -u");
    assert!(
        out.contains("gone") && out.trim_end().ends_with("\n0"),
        "{out}"
    );
    let root = image::resolve(&data, "dev").unwrap();
    assert!(!root.join("usr/bin/mine").exists());
    gw.stop();
}

#[test]
fn bwrap_a_per_thread_root_inside_conversation_keeps_its_system_layer() {
    let data = fresh_dir("img-root-pt").join("data");
    let src = rootfs::make(&fresh_dir("img-root-pt-src").join("root"));
    image::import(&data, &scratch().join("run"), "dev", &src).expect("import");
    let cfg = format!(
        "{}root_inside = true\nsandbox = \"per-thread\"\n",
        config("bwrap", "dev")
    );
    let gw = Gw::try_start_in(data, &cfg, Vec::new()).expect("started");
    let c = gw.client(None);
    let out = run(&c, "t1", "echo kept > /usr/bin/mine && echo wrote");
    assert!(out.contains("wrote"), "{out}");
    let out = run_nth(&c, "t1", "cat /usr/bin/mine", 2);
    assert!(out.contains("kept"), "{out}");
    let out = run(
        &c,
        "t2",
        "cat /usr/bin/mine 2>&1 || echo other-thread-does-not-see-it",
    );
    assert!(out.contains("other-thread-does-not-see-it"), "{out}");
    gw.stop();
}

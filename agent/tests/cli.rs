//! The `tern` CLI's errors when there is nothing to talk to (clear words, non-zero exit).

use std::process::Command;

fn tern(args: &[&str], run_dir: &std::path::Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["--run-dir"])
        .arg(run_dir)
        .args(["--state-dir"])
        .arg(run_dir.join("state"))
        .args(args)
        .output()
        .expect("run tern");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn status_and_down_without_a_daemon_say_so() {
    let d = tempfile::tempdir().expect("tmp");
    let (ok, out) = tern(&["status"], d.path());
    assert!(!ok);
    assert!(out.contains("daemon is not running"), "{out}");
    let (ok, out) = tern(&["down"], d.path());
    assert!(!ok);
    assert!(out.contains("daemon is not running"), "{out}");
}

#[test]
fn up_without_a_management_url_explains_what_is_missing() {
    let d = tempfile::tempdir().expect("tmp");
    let (ok, out) = tern(&["up"], d.path());
    assert!(!ok);
    assert!(
        out.contains("--management-url") || out.contains("needs root"),
        "{out}"
    );
}

#[test]
fn up_against_an_unreachable_server_fails_clearly() {
    let d = tempfile::tempdir().expect("tmp");
    // Port 9 on loopback: nothing listens there.
    let (ok, out) = tern(
        &[
            "up",
            "--management-url",
            "http://127.0.0.1:9",
            "--setup-key",
            "x",
        ],
        d.path(),
    );
    assert!(!ok);
    assert!(
        out.contains("cannot reach management") || out.contains("needs root"),
        "{out}"
    );
    let (ok, out) = tern(
        &["up", "--management-url", "not a url", "--setup-key", "x"],
        d.path(),
    );
    assert!(!ok);
    assert!(
        out.contains("not a valid") || out.contains("needs root"),
        "{out}"
    );
}

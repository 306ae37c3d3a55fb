//! The scale harness at 2,000 agents (issue 16): every agent gets its first map, a policy edit
//! reaches every stream, a team's policy edit, a new peer and a peer going offline reach their
//! team; figures printed.
//! Larger runs: `cargo run --release -p tern-tests --bin tern-scale -- 1000 5000 10000`.

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_agents_get_their_maps_and_every_change() {
    let f = tern_tests::scale::run(2000, 20, Duration::from_secs(180))
        .await
        .expect("harness");
    eprintln!("{f}");
    let edit = &f.changes[0];
    assert_eq!(
        edit.reached, 2001,
        "the policy edit reached every stream: {f}"
    );
    let team_edit = &f.changes[1];
    assert_eq!(
        team_edit.reached, 100,
        "a team's policy edit concerns that team alone: {f}"
    );
    let newcomer = &f.changes[2];
    assert!(
        (100..=102).contains(&newcomer.reached),
        "a new peer concerns its team (100) and the monitoring host: {f}"
    );
    let offline = &f.changes[3];
    assert!(
        (99..=101).contains(&offline.reached),
        "a peer going offline concerns its team and the monitoring host: {f}"
    );
}

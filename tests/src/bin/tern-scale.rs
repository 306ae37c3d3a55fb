//! Runs the scale harness (`tern_tests::scale`) at each agent count given (default 1000) and
//! prints its figures: `cargo run --release -p tern-tests --bin tern-scale -- 1000 5000 10000`.

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let counts: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    for n in if counts.is_empty() {
        vec![1000]
    } else {
        counts
    } {
        let teams = (n / 100).max(1);
        let f = tern_tests::scale::run(n, teams, std::time::Duration::from_secs(600)).await?;
        println!("{f}");
    }
    Ok(())
}

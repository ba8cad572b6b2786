//! Idle workers do not spin: once a job is over, a federation of three workers (with the
//! coordinator, all in this process, the only test of this binary) uses almost no CPU.
#![cfg(target_os = "linux")]

use std::time::{Duration, Instant};

use sovra_proto::pb::set_placement_request::How;
use sovra_tests::federation::{chat_request, fleet, run_job};

const PROVIDERS: [(&str, &str); 3] = [("ovh-fr", "FR"), ("ionos-de", "DE"), ("scw-nl", "NL")];

/// CPU time this process has used (user and system).
fn cpu_time() -> Duration {
    let stat = sovra_tests::proc_stat("self").expect("/proc/self/stat");
    let ticks: u64 = stat[11].parse::<u64>().unwrap() + stat[12].parse::<u64>().unwrap();
    // Linux reports these in clock ticks of 1/100 s (USER_HZ).
    Duration::from_millis(ticks * 10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_job_the_federation_idles_without_spinning() {
    let (fed, _workers, tenant) = fleet(&PROVIDERS, "q8_0").await;
    fed.place("smollm2", How::Stages(3)).await;
    let out = run_job(
        fed.channel(Some(&tenant)).await,
        chat_request("Name three rivers.", 24, 0.0, 0),
    )
    .await
    .expect("job");
    assert_eq!(out.tokens.len(), 24);
    // Let the sessions close on every stage, then watch the idle federation.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (cpu, wall) = (cpu_time(), Instant::now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = cpu_time() - cpu;
    let share = used.as_secs_f64() / wall.elapsed().as_secs_f64();
    eprintln!("idle: {used:?} of CPU in {:?}", wall.elapsed());
    // Heartbeats and keep-alives only; one thread spinning would use ~100 % of a core.
    assert!(
        share < 0.10,
        "the idle federation used {used:?} of CPU in {:?} ({:.0} % of a core)",
        wall.elapsed(),
        share * 100.0
    );
}

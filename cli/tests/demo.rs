//! The README's run command: `sovra demo` streams, through a coordinator and three worker
//! processes of three providers, exactly what `sovra generate --local --chat` gives.

use std::process::Command;

use serde_json::Value;

fn json_lines(out: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

#[test]
fn demo_streams_what_local_generation_gives() {
    sovra_tests::smollm2_path();
    let sovra = env!("CARGO_BIN_EXE_sovra");
    let common = [
        "--json",
        "--ignore-eos",
        "--max-tokens",
        "12",
        "--temperature",
        "0.7",
        "--seed",
        "3",
    ];
    let demo = Command::new(sovra)
        .arg("demo")
        .args(common)
        .arg("What is the capital of France?")
        .output()
        .unwrap();
    assert!(
        demo.status.success(),
        "{}",
        String::from_utf8_lossy(&demo.stderr)
    );
    let local = Command::new(sovra)
        .args(["generate", "--local", "-m", "smollm2", "--chat"])
        .args(common)
        .arg("What is the capital of France?")
        .output()
        .unwrap();
    assert!(local.status.success());
    let (demo, local) = (json_lines(&demo.stdout), json_lines(&local.stdout));
    assert_eq!(demo.len(), 13);
    assert_eq!(demo[..12], local[..12], "token lines are identical");
    let (d, l) = (&demo[12], &local[12]);
    for key in ["type", "prompt_tokens", "generated_tokens", "finish_reason"] {
        assert_eq!(d[key], l[key], "{key}");
    }
    assert!(d["job_id"].as_str().unwrap().starts_with("job-"));
    for key in ["ttft_ms", "prompt_tok_s", "decode_tok_s"] {
        assert!(d[key].as_f64().unwrap() > 0.0);
    }
}

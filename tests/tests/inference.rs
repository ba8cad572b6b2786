//! Jobs pipelined over QUIC across workers of several providers give exactly the tokens one
//! process gives; concurrency, cancellation, tenancy and peer identity are enforced.

use std::time::Duration;

use sovra_model::{ChatPrompt, LayerRange, SamplingParams, StopConditions, WeightMode};
use sovra_proto::pb;
use sovra_proto::pb::set_placement_request::How;
use sovra_tests::federation::{chat_request, eventually, fleet, fleet_with, run_job};
use sovra_worker::{GenerateRequest, generate};
use tonic::Code;

const PROVIDERS: [(&str, &str); 3] = [("ovh-fr", "FR"), ("ionos-de", "DE"), ("scw-nl", "NL")];

/// The tokens `generate --local` gives for a chat prompt.
fn local_tokens(
    mode: WeightMode,
    question: &str,
    max_tokens: usize,
    sampling: SamplingParams,
) -> Vec<u32> {
    let (model, tokenizer) = sovra_tests::smollm2();
    let pipeline = sovra_tests::pipeline(&model, &[LayerRange::new(0, model.spec().layers)], mode);
    let prompt = tokenizer
        .encode(
            &ChatPrompt {
                user: question.into(),
                system: None,
            }
            .render(),
        )
        .unwrap();
    let request = GenerateRequest {
        prompt,
        sampling,
        stop: StopConditions {
            max_tokens,
            stop: vec![],
            ignore_eos: true,
        },
    };
    generate(&pipeline, &tokenizer, &request, |_| {})
        .unwrap()
        .sampled
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn distributed_greedy_equals_local_for_every_golden_case_on_1_2_and_3_stages() {
    let (fed, _workers, tenant) = fleet(&PROVIDERS, "f32").await;
    let cases = sovra_tests::golden_cases().unwrap();
    for stages in [1u32, 2, 3] {
        let placement = fed.place("smollm2", How::Stages(stages)).await;
        assert_eq!(placement.chains[0].stages.len(), stages as usize);
        for case in &cases {
            let out = run_job(
                fed.channel(Some(&tenant)).await,
                chat_request(&case.question, 32, 0.0, 0),
            )
            .await
            .unwrap();
            assert_eq!(
                out.tokens, case.generated_ids,
                "{stages} stages, {:?}",
                case.question
            );
            assert_eq!(out.stages.len(), stages as usize);
            assert_eq!(out.summary.generated_tokens, 32);
            assert_eq!(out.summary.prompt_tokens as usize, case.prompt_ids.len());
            assert_eq!(out.summary.finish_reason, "length");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sampled_jobs_equal_local_and_concurrent_jobs_equal_solo_runs() {
    // The head batches sessions as the demo's does, so concurrent sessions share forwards.
    let (fed, _workers, tenant) = fleet_with(&PROVIDERS, "q8_0", Duration::from_millis(30)).await;
    fed.place("smollm2", How::Stages(3)).await;
    let sampling = SamplingParams {
        temperature: 0.8,
        top_k: None,
        top_p: None,
        seed: 42,
    };
    let expected = local_tokens(
        WeightMode::Q8_0,
        "Tell me a story about a dragon.",
        24,
        sampling,
    );
    let out = run_job(
        fed.channel(Some(&tenant)).await,
        chat_request("Tell me a story about a dragon.", 24, 0.8, 42),
    )
    .await
    .unwrap();
    assert_eq!(out.tokens, expected, "temperature 0.8, seed 42");

    let questions: Vec<String> = (0..8)
        .map(|i| format!("Give me fact number {i} about the ocean."))
        .collect();
    let mut solo = Vec::new();
    for (i, q) in questions.iter().enumerate() {
        let r = run_job(
            fed.channel(Some(&tenant)).await,
            chat_request(q, 16, if i % 2 == 0 { 0.0 } else { 0.7 }, i as u64),
        )
        .await
        .unwrap();
        solo.push(r.tokens);
    }
    let mut handles = Vec::new();
    for (i, q) in questions.iter().enumerate() {
        let channel = fed.channel(Some(&tenant)).await;
        let request = chat_request(q, 16, if i % 2 == 0 { 0.0 } else { 0.7 }, i as u64);
        handles.push(tokio::spawn(async move { run_job(channel, request).await }));
    }
    for (i, handle) in handles.into_iter().enumerate() {
        let together = handle.await.unwrap().unwrap();
        assert_eq!(together.tokens, solo[i], "job {i} alone vs among 8");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_frees_every_stage_and_tenants_see_only_their_jobs() {
    let (fed, _workers, tenant) = fleet(&PROVIDERS, "q8_0").await;
    fed.place("smollm2", How::Stages(3)).await;
    let mut stream = pb::jobs_client::JobsClient::new(fed.channel(Some(&tenant)).await)
        .run_job(chat_request(
            "Write a very long essay about rivers.",
            2000,
            0.0,
            0,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut job_id = String::new();
    let mut tokens = 0;
    while tokens < 5 {
        match stream.message().await.unwrap().unwrap().kind {
            Some(pb::job_event::Kind::Started(s)) => job_id = s.job_id,
            Some(pb::job_event::Kind::Token(_)) => tokens += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    // Every stage holds the session's state while it runs.
    eventually(
        "sessions on every stage",
        Duration::from_secs(10),
        || async {
            let busy = fed
                .workers()
                .await
                .iter()
                .filter(|w| w.open_sessions == 1 && w.kv_cache_bytes > 0)
                .count();
            (busy == 3).then_some(())
        },
    )
    .await;

    // Another tenant can neither read nor cancel it.
    let other = pb::tenants_client::TenantsClient::new(fed.operator().await)
        .add_tenant(pb::AddTenantRequest {
            name: "globex".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut as_other = pb::jobs_client::JobsClient::new(fed.channel(Some(&other)).await);
    assert_eq!(
        as_other
            .get_job(pb::JobRef {
                job_id: job_id.clone()
            })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        as_other
            .cancel_job(pb::JobRef {
                job_id: job_id.clone()
            })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert!(
        as_other
            .list_jobs(pb::ListJobsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .jobs
            .is_empty()
    );

    let mut as_owner = pb::jobs_client::JobsClient::new(fed.channel(Some(&tenant)).await);
    let cancelled = as_owner
        .cancel_job(pb::JobRef {
            job_id: job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state, "cancelled");
    let end = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            other => break other,
        }
    };
    assert_eq!(end.unwrap_err().code(), Code::Cancelled);
    eventually(
        "every stage to free the session",
        Duration::from_secs(10),
        || async {
            fed.workers()
                .await
                .iter()
                .all(|w| w.open_sessions == 0 && w.kv_cache_bytes == 0)
                .then_some(())
        },
    )
    .await;
    let record = as_owner
        .get_job(pb::JobRef {
            job_id: job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(record.state, "cancelled");
    assert_eq!(record.error, "cancelled by tenant acme", "who cancelled it");
    assert!(record.token_ids.len() >= 5);
    let mut countries: Vec<String> = record.audit.iter().map(|a| a.country.clone()).collect();
    countries.sort();
    assert_eq!(
        countries,
        ["DE", "FR", "NL"],
        "the audit shows where each layer ran"
    );
    assert_eq!(record.audit.first().unwrap().start_layer, 0);
    assert_eq!(record.audit.last().unwrap().end_layer, 30);
    // The operator sees every job.
    let all = pb::jobs_client::JobsClient::new(fed.operator().await)
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(all.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn job_policies_narrow_the_model_and_bad_requests_are_refused() {
    let (fed, _workers, tenant) = fleet(&PROVIDERS, "q8_0").await;
    fed.place("smollm2", How::Stages(3)).await;
    let mut request = chat_request("Hello", 4, 0.0, 0);
    request.policy = Some(pb::Policy {
        countries: vec!["FR".into(), "DE".into()],
        ..Default::default()
    });
    let err = run_job(fed.channel(Some(&tenant)).await, request)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("NL"),
        "the refusal names the stage outside the policy: {}",
        err.message()
    );
    for (bad, what) in [
        (
            pb::Sampling {
                max_tokens: 0,
                ..Default::default()
            },
            "max tokens",
        ),
        (
            pb::Sampling {
                max_tokens: 4,
                temperature: f32::NAN,
                ..Default::default()
            },
            "temperature",
        ),
        (
            pb::Sampling {
                max_tokens: 4,
                top_p: 2.0,
                ..Default::default()
            },
            "top-p",
        ),
    ] {
        let mut request = chat_request("Hello", 4, 0.0, 0);
        request.sampling = Some(bad);
        let err = run_job(fed.channel(Some(&tenant)).await, request)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
    }
    let mut unknown = chat_request("Hello", 4, 0.0, 0);
    unknown.model = "gpt-9".into();
    assert_eq!(
        run_job(fed.channel(Some(&tenant)).await, unknown)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    // A prompt longer than the context is the request's fault: said as such.
    let long = chat_request(&"word ".repeat(9000), 4, 0.0, 0);
    let err = run_job(fed.channel(Some(&tenant)).await, long)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("context"), "{}", err.message());
    // The federation keeps serving after every refusal.
    let ok = run_job(
        fed.channel(Some(&tenant)).await,
        chat_request("Hello", 4, 0.0, 0),
    )
    .await
    .unwrap();
    assert_eq!(ok.tokens.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn absurd_control_plane_fields_are_refused() {
    let (fed, _workers, tenant) = fleet(&[("ovh-fr", "FR")], "q8_0").await;
    fed.place("smollm2", How::Stages(1)).await;
    let mut huge = chat_request("Hello", 4, 0.0, 0);
    huge.sampling.as_mut().unwrap().max_tokens = u32::MAX;
    assert_eq!(
        run_job(fed.channel(Some(&tenant)).await, huge)
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    let mut many_stops = chat_request("Hello", 4, 0.0, 0);
    many_stops.sampling.as_mut().unwrap().stop = vec!["x".into(); 100];
    assert_eq!(
        run_job(fed.channel(Some(&tenant)).await, many_stops)
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    // A policy of 100,000 certifications (quadratic work for the coordinator) and a system
    // turn of 2 MiB (tokenized on the head's data-plane thread) are refused outright.
    let mut long_policy = chat_request("Hello", 4, 0.0, 0);
    long_policy.policy = Some(pb::Policy {
        required_certifications: (0..100_000).map(|i| format!("c{i}")).collect(),
        ..Default::default()
    });
    let mut long_system = chat_request("Hello", 4, 0.0, 0);
    long_system.system = "be brief ".repeat(240_000);
    for (request, says) in [(long_policy, "at most 256"), (long_system, "system turn")] {
        let err = run_job(fed.channel(Some(&tenant)).await, request)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(says), "{}", err.message());
    }
    let mut no_model = chat_request("Hello", 4, 0.0, 0);
    no_model.model = String::new();
    assert_eq!(
        run_job(fed.channel(Some(&tenant)).await, no_model)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let mut models = pb::models_client::ModelsClient::new(fed.operator().await);
    let missing_spec = pb::AddModelRequest {
        name: "x".into(),
        dtype: "q8_0".into(),
        file_sha256: "0".repeat(64),
        ..Default::default()
    };
    assert_eq!(
        models.add_model(missing_spec).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let absurd_spec = pb::AddModelRequest {
        name: "y".into(),
        dtype: "q8_0".into(),
        file_sha256: "0".repeat(64),
        spec: Some(pb::ModelSpec {
            architecture: "llama".into(),
            layers: 1_000_000,
            ..Default::default()
        }),
        ..Default::default()
    };
    assert_eq!(
        models.add_model(absurd_spec).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    // Sizes whose sums over the layers would overflow.
    let mut huge = sovra_tests::federation::smollm2_model("q8_0");
    huge.name = "z".into();
    let spec = huge.spec.as_mut().unwrap();
    spec.layer_params = u64::MAX / 3;
    spec.layer_bytes = vec![u64::MAX / 3; spec.layers as usize];
    let err = models.add_model(huge).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("beyond any model"),
        "{}",
        err.message()
    );
    let mut placements = pb::placements_client::PlacementsClient::new(fed.operator().await);
    let zero = pb::SetPlacementRequest {
        model: "smollm2".into(),
        how: Some(How::Stages(0)),
    };
    assert_eq!(
        placements.set_placement(zero).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let too_many = pb::SetPlacementRequest {
        model: "smollm2".into(),
        how: Some(How::Stages(1000)),
    };
    assert_eq!(
        placements.set_placement(too_many).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    // An absurd id is refused with a short message that echoes no control characters (a
    // 17,000-character id broke the HTTP/2 stream as its status header).
    let odd = format!("job-\x1b[31m{}", "9".repeat(20_000));
    let err = pb::jobs_client::JobsClient::new(fed.channel(Some(&tenant)).await)
        .get_job(pb::JobRef { job_id: odd })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(
        err.message().len() < 300 && !err.message().contains('\x1b'),
        "{}",
        err.message()
    );
    // A stop string in the first token: no token to show, yet the prompt's time is measured.
    let first = run_job(
        fed.channel(Some(&tenant)).await,
        chat_request("What is the capital of France?", 1, 0.0, 0),
    )
    .await
    .unwrap();
    let mut stopped = chat_request("What is the capital of France?", 8, 0.0, 0);
    stopped.sampling.as_mut().unwrap().stop = vec![first.text.trim().to_string()];
    let out = run_job(fed.channel(Some(&tenant)).await, stopped)
        .await
        .unwrap();
    assert_eq!(out.summary.finish_reason, "stop", "{:?}", out.summary);
    assert!(out.tokens.is_empty(), "{:?}", out.tokens);
    assert!(out.summary.ttft_ms > 1.0, "{:?}", out.summary);
    assert!(
        out.summary.prompt_tok_s > 0.0 && out.summary.prompt_tok_s < 1e6,
        "{:?}",
        out.summary
    );
    // A model whose file does not match on the worker: the job says why no stage is ready.
    let mut wrong_hash = sovra_tests::federation::smollm2_model("q8_0");
    wrong_hash.name = "wrong-hash".into();
    wrong_hash.file_sha256 = "0".repeat(64);
    models.add_model(wrong_hash).await.unwrap();
    let mut job = chat_request("Hello", 4, 0.0, 0);
    job.model = "wrong-hash".into();
    let err = eventually("the load to fail", Duration::from_secs(60), || {
        let (channel, job) = (fed.channel(Some(&tenant)), job.clone());
        async move {
            let err = run_job(channel.await, job).await.unwrap_err();
            err.message()
                .contains("could not load layers")
                .then_some(err)
        }
    })
    .await;
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("sha256"), "{}", err.message());
    // Still serving.
    assert_eq!(
        run_job(
            fed.channel(Some(&tenant)).await,
            chat_request("Hello", 4, 0.0, 0)
        )
        .await
        .unwrap()
        .tokens
        .len(),
        4
    );
}

/// 3,000 random words of a small vocabulary (3,474 prompt tokens with the chat template): a
/// prompt whose greedy tokens differ between a prefill of the whole prompt at once and one in
/// 64-position chunks (attention sums in another order), as the stages run it.
const LONG_PROMPT: &str = include_str!("../data/random_words_3000.txt");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_prompt_gives_the_local_tokens() {
    let (fed, _workers, tenant) = fleet(&[("ovh-fr", "FR")], "q8_0").await;
    fed.place("smollm2", How::Stages(1)).await;
    let out = run_job(
        fed.channel(Some(&tenant)).await,
        chat_request(LONG_PROMPT, 5, 0.0, 0),
    )
    .await
    .unwrap();
    let local = local_tokens(WeightMode::Q8_0, LONG_PROMPT, 5, SamplingParams::default());
    assert_eq!(out.tokens, local);
}

//! Whole-system scenarios on the simulated cluster: the real operator, the simulated
//! API server and kubelet, and the real RabbitMQ (skipped, with a message, when no
//! broker answers on 127.0.0.1:5672 or at TESTRUNNER_AMQP_URI).

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use serde_json::json;
use testrunner_operator::crd::TestRunnerPool;
use testrunner_operator::sim;

fn broker_uri() -> String {
    std::env::var("TESTRUNNER_AMQP_URI")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

async fn broker() -> Option<lapin::Connection> {
    let uri = testrunner_operator::broker::BrokerUri::parse(&broker_uri()).ok()?;
    let connect =
        lapin::Connection::connect_uri(uri.amqp_uri(), lapin::ConnectionProperties::default());
    match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Ok(Ok(c)) => Some(c),
        _ => None,
    }
}

async fn depth(conn: &lapin::Connection, queue: &str) -> u32 {
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    q.message_count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_surge_scales_the_pool_up_and_deleting_the_pool_removes_its_pods() {
    let Some(conn) = broker().await else {
        eprintln!("SKIPPED: no RabbitMQ answers at the broker URI; this scenario needs one");
        return;
    };
    let queue = format!(
        "sim-surge-{}-{}",
        std::process::id(),
        jiff::Timestamp::now().as_millisecond()
    );
    let sim = sim::Simulation::start(
        "127.0.0.1:0".parse().unwrap(),
        &broker_uri(),
        50.0,
        env!("CARGO_BIN_EXE_testrunner-operator").into(),
    )
    .await
    .unwrap();
    let client = sim.api.client();
    let operator = sim::start_operator(client.clone());

    let ids = sim::publish::publish(&broker_uri(), &queue, 6, true)
        .await
        .unwrap();
    assert_eq!(ids.len(), 6);
    let pools: Api<TestRunnerPool> = Api::namespaced(client.clone(), "default");
    let pool: TestRunnerPool = serde_json::from_value(json!({
        "apiVersion": "testrunner.dev/v1alpha1", "kind": "TestRunnerPool",
        "metadata": {"name": "surge"},
        "spec": {"image": "example.org/runner:1", "command": ["sh", "-c", "exit 1"],
            "queue": {"name": queue, "connectionSecretRef": {"name": "rabbitmq", "key": "uri"}},
            "scaling": {"minWorkers": 0, "maxWorkers": 4, "pollInterval": "500ms"}},
    }))
    .unwrap();
    let started = tokio::time::Instant::now();
    pools.create(&PostParams::default(), &pool).await.unwrap();

    // Six tickets, at most four workers: four pods within the poll interval plus a margin.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let selector = ListParams::default().labels("testrunner.dev/pool=surge");
    let deadline = started + Duration::from_millis(500) + Duration::from_secs(15);
    loop {
        let n = pods.list(&selector).await.unwrap().items.len();
        let desired = pools
            .get_status("surge")
            .await
            .unwrap()
            .status
            .and_then(|s| s.workers)
            .map(|w| w.desired);
        if n == 4 && desired == Some(4) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pool did not scale to 4 (pods {n}, desired {desired:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    pools
        .delete("surge", &DeleteParams::default())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !pods.list(&selector).await.unwrap().items.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pool's pods did not go"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing lost: the test command always fails, so no ticket is ever acked; once the
    // workers are gone every ticket is back in (or still in) the queue.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while depth(&conn, &queue).await != 6 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "tickets went missing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    operator.abort();
    sim.shutdown().await;
    let ch = conn.create_channel().await.unwrap();
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
}

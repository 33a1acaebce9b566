//! Kubernetes events, one series per distinct message.
//!
//! kube's `Recorder` (like client-go's event recorder) folds events with the same type,
//! reason, action and object into one series that keeps the *first* event's note: a
//! second `RolloutStarted` would show the revision of the first. Here an event that
//! repeats its predecessor's note word for word still joins its series (`x3 over 2m`),
//! and a new note starts a new event.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

/// How long a series stays open for repeats (kube's own cache keeps events 6 minutes).
const SERIES_TTL: Duration = Duration::from_secs(6 * 60);

type Key = (String, bool, String, String);

/// Event publisher.
pub struct Events {
    client: Client,
    reporter: Reporter,
    series: Mutex<HashMap<Key, (String, Recorder, Instant)>>,
}

impl Events {
    /// A publisher reporting as `reporter`.
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Self {
            client,
            reporter,
            series: Mutex::default(),
        }
    }

    /// Publishes `event` about `regarding`.
    pub async fn publish(
        &self,
        event: &Event,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let object = regarding.uid.clone().unwrap_or_else(|| {
            format!(
                "{}/{}",
                regarding.namespace.as_deref().unwrap_or_default(),
                regarding.name.as_deref().unwrap_or_default()
            )
        });
        let key = (
            object,
            event.type_ == EventType::Warning,
            event.reason.clone(),
            event.action.clone(),
        );
        let note = event.note.clone().unwrap_or_default();
        let recorder = {
            let mut series = self.series.lock().expect("lock");
            let now = Instant::now();
            series.retain(|_, (_, _, last)| now.duration_since(*last) < SERIES_TTL);
            let entry = series.entry(key).or_insert_with(|| {
                (
                    note.clone(),
                    Recorder::new(self.client.clone(), self.reporter.clone()),
                    now,
                )
            });
            if entry.0 != note {
                *entry = (
                    note,
                    Recorder::new(self.client.clone(), self.reporter.clone()),
                    now,
                );
            }
            entry.2 = now;
            entry.1.clone()
        };
        recorder.publish(event, regarding).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Method, Request, Response};
    use kube::client::Body;

    #[tokio::test]
    async fn a_repeated_note_joins_its_series_and_a_new_note_starts_a_new_event() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let events = Events::new(
            Client::new(service, "ci"),
            Reporter {
                controller: "testrunner-operator".into(),
                instance: None,
            },
        );
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..4 {
                let (req, send) = handle.next_request().await.expect("a request");
                let method = req.method().clone();
                let bytes = req.into_body().collect_bytes().await.unwrap();
                let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                seen.push((
                    method,
                    body["note"].as_str().unwrap_or_default().to_string(),
                    body["series"]["count"].as_i64(),
                ));
                send.send_response(
                    Response::builder()
                        .status(201)
                        .body(Body::from(bytes.to_vec()))
                        .unwrap(),
                );
            }
            seen
        });
        let regarding = ObjectReference {
            api_version: Some("testrunner.dev/v1alpha1".into()),
            kind: Some("TestRunnerPool".into()),
            name: Some("unit".into()),
            namespace: Some("ci".into()),
            uid: Some("0b4d0c6e".into()),
            ..Default::default()
        };
        let event = |note: &str| Event {
            type_: EventType::Normal,
            reason: "RolloutStarted".into(),
            note: Some(note.into()),
            action: "Rollout".into(),
            secondary: None,
        };
        for note in ["to rev a", "to rev a", "to rev b", "to rev a"] {
            events.publish(&event(note), &regarding).await.unwrap();
        }
        let seen = server.await.unwrap();
        let seen: Vec<(Method, &str, Option<i64>)> = seen
            .iter()
            .map(|(m, n, c)| (m.clone(), n.as_str(), *c))
            .collect();
        assert_eq!(
            seen,
            [
                (Method::POST, "to rev a", None),
                (Method::PATCH, "to rev a", Some(2)),
                (Method::POST, "to rev b", None),
                (Method::POST, "to rev a", None),
            ]
        );
    }
}

//! A fault-injecting API server front: a plain-HTTP server that the operator's client
//! talks to (its kubeconfig points here) and that passes each request on to the real
//! API server through a full-rights client of it (the embedded API server over HTTP, or
//! a real kube-apiserver over HTTPS with client certificates). While a fault is set it
//! answers instead of the API server (500, 429 with `Retry-After`, 409 on writes, 410
//! Gone on a watch's resume), cuts watches short, or delays every answer. It records
//! every request it receives, so that a test can count what the operator sent during a
//! fault.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use futures::StreamExt;
use http_body_util::BodyExt;
use serde_json::json;

/// What the front does to the requests it receives.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum ApiFault {
    /// Nothing: every request goes to the API server and its answer back.
    #[default]
    None,
    /// 500 Internal Server Error on one request in `every` (1: on all of them).
    ServerError { every: u64 },
    /// 429 Too Many Requests with `Retry-After: <retry_after>` on every request.
    TooManyRequests { retry_after: u64 },
    /// 409 Conflict on every write (POST, PUT, PATCH, DELETE) except events'.
    ConflictOnWrites,
    /// Each watch is cut after `after`, one in two with the connection broken and the
    /// other ended cleanly; the first watch of the same path after a cut that resumes
    /// from a resourceVersion is answered with an ERROR event of 410 Gone (its
    /// resourceVersion expired meanwhile), so the client has to list again.
    DropWatches { after: Duration },
    /// Every answer held back by `delay`.
    Slow { delay: Duration },
}

/// One request the front received.
#[derive(Clone, Debug)]
pub struct Seen {
    /// When it arrived.
    pub at: Instant,
    pub method: Method,
    pub path: String,
    pub query: String,
    /// A watch (`watch=true` or `watch=1`).
    pub watch: bool,
    /// The status the front answered (the API server's when it passed the request on,
    /// 502 when the API server could not be reached).
    pub status: u16,
    /// The front answered itself (the fault), not the API server.
    pub injected: bool,
}

impl Seen {
    /// A write (POST, PUT, PATCH, DELETE).
    pub fn write(&self) -> bool {
        is_write(&self.method)
    }

    /// Method, path and query: the same request sent again has the same key.
    pub fn key(&self) -> String {
        format!("{} {}?{}", self.method, self.path, self.query)
    }

    /// Method and the path without names: `GET /api/v1/namespaces/default/pods`,
    /// `PATCH /apis/testrunner.dev/v1alpha1/namespaces/default/testrunnerpools/*/status`.
    pub fn kind(&self) -> String {
        let segs: Vec<&str> = self.path.split('/').filter(|s| !s.is_empty()).collect();
        let base = if segs.first() == Some(&"api") { 2 } else { 3 };
        let (prefix, mut rest) = segs.split_at(base.min(segs.len()));
        let mut out: Vec<&str> = prefix.to_vec();
        if rest.len() > 2 && rest[0] == "namespaces" {
            out.extend(["namespaces", "*"]);
            rest = &rest[2..];
        }
        for (i, seg) in rest.iter().enumerate() {
            // resource, name, subresource
            out.push(if i == 1 { "*" } else { seg });
        }
        let watch = if self.watch { " (watch)" } else { "" };
        format!("{} /{}{watch}", self.method, out.join("/"))
    }
}

fn is_write(method: &Method) -> bool {
    matches!(
        *method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    )
}

struct Shared {
    upstream: kube::Client,
    /// The fault, and when it was set.
    fault: tokio::sync::watch::Sender<(ApiFault, Instant)>,
    seen: Mutex<Vec<Seen>>,
    requests: AtomicU64,
    /// Watches cut: broken, and ended cleanly.
    broken: AtomicU64,
    ended: AtomicU64,
    /// Paths of watches cut whose next resume is answered 410 Gone.
    expired: Mutex<std::collections::HashSet<String>>,
}

/// The running front.
pub struct ApiProxy {
    url: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl ApiProxy {
    /// Listens on 127.0.0.1 (a free port) and passes requests on through `upstream`.
    pub async fn start(upstream: kube::Client) -> ApiProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("the API front binds a port");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shared = Arc::new(Shared {
            upstream,
            fault: tokio::sync::watch::Sender::new((ApiFault::None, Instant::now())),
            seen: Mutex::default(),
            requests: AtomicU64::new(0),
            broken: AtomicU64::new(0),
            ended: AtomicU64::new(0),
            expired: Mutex::default(),
        });
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        ApiProxy { url, shared, task }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A client of the front, as the operator builds one from a kubeconfig that points
    /// here (with kube's default retry of 429, 503 and 504).
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url.parse().expect("a valid URL"));
        kube::Client::try_from(config).expect("a client for a plain HTTP URL")
    }

    /// Sets the fault; returns when it took effect.
    pub fn set(&self, fault: ApiFault) -> Instant {
        let now = Instant::now();
        self.shared.fault.send_replace((fault, now));
        now
    }

    /// Watches cut so far: (with the connection broken, ended cleanly).
    pub fn watches_cut(&self) -> (u64, u64) {
        (
            self.shared.broken.load(Ordering::Relaxed),
            self.shared.ended.load(Ordering::Relaxed),
        )
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    /// The requests received in `[from, to)`.
    pub fn seen_between(&self, from: Instant, to: Instant) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.at >= from && s.at < to)
            .collect()
    }
}

impl Drop for ApiProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A Kubernetes `Status` answer.
fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code});
    let mut r = Response::new(Body::from(body.to_string()));
    *r.status_mut() = StatusCode::from_u16(code).unwrap();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn query_param(query: &str, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The front's answer to one request.
async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let at = Instant::now();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().unwrap_or("").to_string();
    let watch = query_param(&query, "watch").is_some_and(|v| v == "true" || v == "1");
    let n = shared.requests.fetch_add(1, Ordering::Relaxed);
    let fault = shared.fault.borrow().0.clone();
    let events = path.contains("/events");
    let resumes = watch
        && query_param(&query, "resourceVersion").is_some_and(|rv| !rv.is_empty() && rv != "0");
    let injected = match &fault {
        ApiFault::ServerError { every } if n % every.max(&1) == 0 => Some(status(
            500,
            "InternalError",
            "Internal error occurred: injected by the fault suite",
        )),
        ApiFault::TooManyRequests { retry_after } => {
            let mut r = status(
                429,
                "TooManyRequests",
                "the server has received too many requests and has asked us to try again later",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
            Some(r)
        }
        ApiFault::ConflictOnWrites if is_write(&parts.method) && !events => Some(status(
            409,
            "Conflict",
            "Operation cannot be fulfilled: the object has been modified; please apply your changes to the latest version and try again",
        )),
        ApiFault::DropWatches { .. } if resumes && shared.expired.lock().unwrap().remove(&path) => {
            let event = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
                "metadata": {}, "status": "Failure", "message": "too old resource version",
                "reason": "Expired", "code": 410}});
            let mut r = Response::new(Body::from(format!("{event}\n")));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            Some(r)
        }
        _ => None,
    };
    let mut seen = Seen {
        at,
        method: parts.method.clone(),
        path,
        query,
        watch,
        status: 0,
        injected: injected.is_some(),
    };
    if let Some(r) = injected {
        // A watch's 410 Gone comes as an ERROR event of a 200 answer.
        seen.status = match fault {
            ApiFault::DropWatches { .. } => 410,
            _ => r.status().as_u16(),
        };
        shared.seen.lock().unwrap().push(seen);
        return r;
    }
    if let ApiFault::Slow { delay } = &fault {
        tokio::time::sleep(*delay).await;
    }
    let answer = pass_on(&shared, parts, body).await;
    seen.status = answer.status().as_u16();
    let path = seen.path.clone();
    shared.seen.lock().unwrap().push(seen);
    if watch && answer.status().is_success() {
        cuttable(answer, shared.clone(), at, path)
    } else {
        answer
    }
}

/// Passes the request on to the API server; its answer, or 502.
async fn pass_on(shared: &Shared, parts: axum::http::request::Parts, body: Body) -> Response {
    let bytes = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return status(400, "BadRequest", &format!("unreadable body: {e}")),
    };
    let target = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_string();
    let mut request = http::Request::builder().method(parts.method).uri(target);
    for name in [header::CONTENT_TYPE, header::ACCEPT, header::USER_AGENT] {
        if let Some(v) = parts.headers.get(&name) {
            request = request.header(name, v);
        }
    }
    let request = request
        .body(kube::client::Body::from(bytes.to_vec()))
        .expect("a valid request");
    match shared.upstream.send(request).await {
        Ok(answer) => {
            let (parts, body) = answer.into_parts();
            let mut r = Response::new(Body::new(body));
            *r.status_mut() = parts.status;
            for name in [header::CONTENT_TYPE, header::RETRY_AFTER] {
                if let Some(v) = parts.headers.get(&name) {
                    r.headers_mut().insert(name, v.clone());
                }
            }
            r
        }
        Err(e) => status(
            502,
            "ServiceUnavailable",
            &format!("the API server did not answer: {e}"),
        ),
    }
}

/// The watch `answer`, begun at `started`, cut once a [`ApiFault::DropWatches`] is set
/// and its `after` has passed since the later of the watch's start and the fault's:
/// one cut in two breaks the connection, the other ends the watch as a server does.
fn cuttable(answer: Response, shared: Arc<Shared>, started: Instant, path: String) -> Response {
    // 0: not cut; 1: ended; 2: broken.
    let how = Arc::new(std::sync::atomic::AtomicU8::new(0));
    let mut faults = shared.fault.subscribe();
    let cut = {
        let how = how.clone();
        async move {
            loop {
                let (fault, since) = faults.borrow_and_update().clone();
                if let ApiFault::DropWatches { after } = fault {
                    let at = started.max(since) + after;
                    tokio::select! {
                        _ = tokio::time::sleep_until(at.into()) => break,
                        changed = faults.changed() => if changed.is_err() {
                            std::future::pending::<()>().await;
                        },
                    }
                } else if faults.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            shared.expired.lock().unwrap().insert(path);
            let cuts = shared.broken.load(Ordering::Relaxed) + shared.ended.load(Ordering::Relaxed);
            if cuts.is_multiple_of(2) {
                shared.broken.fetch_add(1, Ordering::Relaxed);
                how.store(2, Ordering::Relaxed);
            } else {
                shared.ended.fetch_add(1, Ordering::Relaxed);
                how.store(1, Ordering::Relaxed);
            }
        }
    };
    let (parts, body) = answer.into_parts();
    let tail = futures::stream::once(async move { how.load(Ordering::Relaxed) == 2 }).filter_map(
        |broken| async move {
            broken.then(|| {
                Err(axum::Error::new(std::io::Error::other(
                    "watch connection broken by the fault suite",
                )))
            })
        },
    );
    let stream = body.into_data_stream().take_until(cut).chain(tail);
    Response::from_parts(parts, Body::from_stream(stream))
}

//! The node's HTTPS endpoint, where the API server sends `kubectl logs`:
//! `GET /containerLogs/{namespace}/{pod}/{container}` with `tailLines` and `follow`, as
//! a kubelet serves it. Loopback only, a self-signed certificate (the API server does not
//! check a kubelet's certificate unless told to), no client authentication.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path as UrlPath, RawQuery, State};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How often a followed log is read for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// Query parameters of `containerLogs`.
#[derive(Debug, Default)]
struct LogQuery {
    tail_lines: Option<usize>,
    follow: bool,
}

impl LogQuery {
    fn parse(query: Option<&str>) -> Self {
        let mut q = Self::default();
        for (k, v) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            match k.as_ref() {
                "tailLines" => q.tail_lines = v.parse().ok(),
                "follow" => q.follow = v == "true" || v == "1",
                _ => {}
            }
        }
        q
    }
}

/// Starts serving on a free loopback port; returns the port.
pub async fn start(
    root: PathBuf,
    node_name: &str,
    mut stop: watch::Receiver<bool>,
) -> Result<(u16, JoinHandle<()>), String> {
    let acceptor = tls_acceptor(node_name)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("failed to listen for the node's endpoint: {e}"))?;
    let port = listener
        .local_addr()
        .map_err(|e| format!("failed to read the node endpoint's port: {e}"))?
        .port();
    let app = axum::Router::new()
        .route(
            "/containerLogs/{namespace}/{pod}/{container}",
            axum::routing::get(container_logs),
        )
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .with_state(Arc::new(root));
    let task = tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                got = listener.accept() => match got {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "the node's endpoint failed to accept");
                        continue;
                    }
                },
                _ = stop.changed() => return,
            };
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = TowerToHyperService::new(app);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Ok((port, task))
}

fn tls_acceptor(node_name: &str) -> Result<tokio_rustls::TlsAcceptor, String> {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), node_name.into()])
            .map_err(|e| format!("failed to make the node's certificate: {e}"))?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup of the node's endpoint: {e}"))?
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)
        .map_err(|e| format!("TLS setup of the node's endpoint: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The log file of a container of the newest pod `namespace/pod` on this node.
fn log_file(root: &Path, namespace: &str, pod: &str, container: &str) -> Option<PathBuf> {
    let prefix = format!("{namespace}_{pod}_");
    std::fs::read_dir(root)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path().join(format!("{container}.log")))
        .filter(|p| p.is_file())
}

/// The last `n` lines of `text` (all of it without `n`).
fn tail(text: &[u8], n: Option<usize>) -> Vec<u8> {
    let Some(n) = n else {
        return text.to_vec();
    };
    let lines: Vec<&[u8]> = text.split_inclusive(|b| *b == b'\n').collect();
    lines[lines.len().saturating_sub(n)..].concat()
}

async fn container_logs(
    State(root): State<Arc<PathBuf>>,
    UrlPath((namespace, pod, container)): UrlPath<(String, String, String)>,
    RawQuery(query): RawQuery,
) -> Response {
    let query = LogQuery::parse(query.as_deref());
    let Some(path) = log_file(&root, &namespace, &pod, &container) else {
        let message =
            format!("container {container:?} of pod {namespace}/{pod} has no log on this node");
        return (http::StatusCode::NOT_FOUND, message).into_response();
    };
    log_body(path, query.tail_lines, query.follow)
}

/// A container's log as a response: all of it or its last `tail_lines` lines; with
/// `follow`, then what the container writes next, until its pod goes (the node removes
/// the file) or the client hangs up.
pub fn log_body(path: PathBuf, tail_lines: Option<usize>, follow: bool) -> Response {
    let text = std::fs::read(&path).unwrap_or_default();
    let first = tail(&text, tail_lines);
    if !follow {
        return first.into_response();
    }
    let start =
        futures::stream::once(async move { Ok::<_, std::io::Error>(bytes::Bytes::from(first)) });
    let more = futures::stream::unfold((path, text.len()), |(path, mut offset)| async move {
        loop {
            tokio::time::sleep(FOLLOW_POLL).await;
            let data = std::fs::read(&path).ok()?;
            if data.len() > offset {
                let chunk = bytes::Bytes::copy_from_slice(&data[offset..]);
                offset = data.len();
                return Some((Ok(chunk), (path, offset)));
            }
        }
    });
    axum::body::Body::from_stream(futures::StreamExt::chain(start, more)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail(b"a\nb\nc\n", Some(2)), b"b\nc\n");
        assert_eq!(tail(b"a\nb\nc", Some(1)), b"c");
        assert_eq!(tail(b"a\nb\n", Some(5)), b"a\nb\n");
        assert_eq!(tail(b"a\nb\n", None), b"a\nb\n");
    }
}

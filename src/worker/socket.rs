//! The broker sidecar and the wrapper that talks to it.
//!
//! In a worker pod the broker credentials reach only the sidecar container
//! (`testrunner-operator broker-sidecar`): it consumes the pool's queue and offers the
//! wrapper in the test container what one worker needs over a Unix socket in a volume
//! the two containers share: the next ticket, done (ack and outcome report), and stop.
//! Quarantine moves and state reports happen in the sidecar; a wrapper that goes away
//! with a ticket in hand (its command crashed, it was killed) gives the ticket back to
//! the queue exactly as a broker connection that closes does.
//!
//! One wrapper at a time: while a session is open, any other connection is answered
//! [`Reply::Busy`] and closed. Nothing that crosses the socket carries the broker URI.
//!
//! Frames are length-delimited (`tokio_util::codec::LengthDelimitedCodec`); each holds
//! one JSON message, except the frame after [`Reply::Ticket`], which is the raw body.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use super::command::Running;
use super::{
    BROKER_TIMEOUT, ConsumeArgs, Exit, FailureCodes, Signals, TerminationLog, Verdict, WorkerArgs,
    verdict,
};
use crate::broker::BrokerUri;
use crate::contract::{TerminationLine, WorkerExit};

/// The environment variable (and flag) naming the socket.
pub const ENV_BROKER_SOCKET: &str = "TESTRUNNER_BROKER_SOCKET";
/// The protocol version a wrapper announces.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest frame: a ticket body can be as large as the broker allows.
const MAX_FRAME: usize = 512 * 1024 * 1024;
/// How long a new connection may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// What the wrapper asks of the sidecar.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    /// The first message of a session.
    Hello { version: u32 },
    /// Send the next ticket when there is one.
    Next,
    /// The ticket in hand is done (passed, or tests failed): ack it and report it.
    Done { exit: Exit, elapsed_ms: u64 },
    /// Take no more tickets; the session ends once nothing is in hand.
    Stop,
}

/// What the sidecar answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// The sidecar consumes the queue for this session.
    Ready,
    /// Another session is open.
    Busy,
    /// The broker cannot be reached (or refused the credentials, or the queue is missing).
    Unavailable { reason: String },
    /// The sidecar's configuration is invalid.
    Misconfigured { reason: String },
    /// A ticket; the next frame is its body.
    Ticket {
        id: String,
        delivery: u64,
        env: Vec<(String, String)>,
    },
    /// The ticket was acked and reported.
    Acked,
    /// The session is over: no ticket was handed out.
    Stopped,
    /// The broker connection was lost: any ticket in hand goes back to the queue.
    BrokerLost { reason: String },
}

/// One end of the socket.
pub struct Link(Framed<UnixStream, LengthDelimitedCodec>);

impl Link {
    fn new(stream: UnixStream) -> Self {
        Self(
            LengthDelimitedCodec::builder()
                .max_frame_length(MAX_FRAME)
                .new_framed(stream),
        )
    }

    /// Sends one message.
    pub async fn send<T: Serialize>(&mut self, message: &T) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(message).map_err(std::io::Error::other)?;
        self.0.send(Bytes::from(bytes)).await
    }

    /// Sends a ticket and its body.
    pub async fn send_ticket(&mut self, ticket: Reply, body: Vec<u8>) -> std::io::Result<()> {
        self.send(&ticket).await?;
        self.0.send(Bytes::from(body)).await
    }

    /// The next message; `None` when the other end closed. Cancel-safe.
    pub async fn recv<T: serde::de::DeserializeOwned>(&mut self) -> std::io::Result<Option<T>> {
        match self.0.next().await {
            None => Ok(None),
            Some(Err(e)) => Err(e),
            Some(Ok(frame)) => serde_json::from_slice(&frame)
                .map(Some)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        }
    }

    /// The body frame that follows a ticket.
    async fn recv_body(&mut self) -> std::io::Result<Vec<u8>> {
        match self.0.next().await {
            Some(Ok(frame)) => Ok(frame.to_vec()),
            Some(Err(e)) => Err(e),
            None => Err(std::io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

/// Connects to the sidecar at `path`.
pub async fn connect(path: &Path) -> std::io::Result<Link> {
    let (addressable, _dir) = addressable(path)?;
    Ok(Link::new(UnixStream::connect(addressable).await?))
}

/// `path` in a form short enough for a socket address (at most 107 bytes on Linux): the
/// path itself when it fits, else its file name under `/proc/self/fd/N` of its
/// directory, which must stay open (the returned file) until the bind or connect is done.
fn addressable(path: &Path) -> std::io::Result<(PathBuf, Option<std::fs::File>)> {
    const MAX: usize = 100;
    if path.as_os_str().len() <= MAX {
        return Ok((path.to_path_buf(), None));
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok((path.to_path_buf(), None));
    };
    let dir = std::fs::File::open(dir)?;
    use std::os::fd::AsRawFd;
    let short = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
    Ok((short, Some(dir)))
}

// ---------------------------------------------------------------------------
// The sidecar
// ---------------------------------------------------------------------------

/// Holds the broker credentials for a worker pod and serves its wrapper over a Unix
/// socket: consumes the queue, moves quarantined tickets, reports the worker's state and
/// outcomes, acks what the wrapper says is done.
#[derive(clap::Args, Clone, Debug)]
pub struct SidecarArgs {
    #[command(flatten)]
    pub consume: ConsumeArgs,
    /// The Unix socket to serve, in a volume shared with the test container.
    #[arg(long, env = ENV_BROKER_SOCKET)]
    pub listen: PathBuf,
    /// File overwritten with the sidecar's state.
    #[arg(
        long,
        env = "TESTRUNNER_TERMINATION_LOG",
        default_value = "/dev/termination-log"
    )]
    pub termination_log: PathBuf,
}

/// Runs the sidecar until SIGTERM; the returned code is the process exit status.
pub async fn serve(args: SidecarArgs) -> ExitCode {
    ExitCode::from(serve_code(args).await)
}

async fn serve_code(args: SidecarArgs) -> u8 {
    let mut log = TerminationLog::new(args.termination_log.clone());
    log.write(&TerminationLine::Starting);
    // A configuration error is told to every wrapper that connects, so that the test
    // container, which the operator watches, says it.
    let setup: Result<(BrokerUri, String), String> = args.consume.broker();
    if let Err(why) = &setup {
        tracing::error!("{why}");
        log.write(&TerminationLine::ConfigError(why.clone()));
    }
    let _ = std::fs::remove_file(&args.listen);
    let listener = match addressable(&args.listen).and_then(|(at, _dir)| UnixListener::bind(at)) {
        Ok(l) => l,
        Err(e) => {
            let why = format!("cannot listen on {}: {e}", args.listen.display());
            tracing::error!("{why}");
            log.write(&TerminationLine::ConfigError(why));
            return WorkerExit::Config.code();
        }
    };
    // The test container runs as a user of the pod's choosing.
    {
        use std::os::unix::fs::PermissionsExt;
        if let Err(e) =
            std::fs::set_permissions(&args.listen, std::fs::Permissions::from_mode(0o666))
        {
            tracing::warn!(socket = %args.listen.display(), error = %e, "cannot open the socket to other users");
        }
    }
    let mut signals = match Signals::new() {
        Ok(s) => s,
        Err(e) => {
            let why = format!("cannot handle signals: {e}");
            log.write(&TerminationLine::ConfigError(why));
            return WorkerExit::Config.code();
        }
    };
    tracing::info!(socket = %args.listen.display(), "serving the worker's broker access");
    let (stop, stopped) = watch::channel(false);
    type Session = Pin<Box<dyn std::future::Future<Output = ()>>>;
    let mut session: Option<Session> = None;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let link = Link::new(stream);
                    if session.is_some() {
                        tokio::spawn(refuse(link));
                    } else {
                        session = Some(Box::pin(run_session(
                            args.consume.clone(),
                            setup.clone(),
                            args.termination_log.clone(),
                            link,
                            stopped.clone(),
                        )));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot accept a connection"),
            },
            _ = async { session.as_mut().expect("guarded").await }, if session.is_some() => {
                session = None;
                if *stop.borrow() {
                    break;
                }
            }
            sig = signals.recv() => {
                if session.is_none() || *stop.borrow() {
                    tracing::info!(signal = %sig, "stopping");
                    break;
                }
                tracing::info!(signal = %sig, "stopping once the wrapper's ticket is done");
                let _ = stop.send(true);
            }
        }
    }
    let _ = std::fs::remove_file(&args.listen);
    0
}

/// Answers a connection made while a session is open: after its hello (so that the
/// other end reads the answer rather than a closed socket), `busy`, then closes it.
async fn refuse(mut link: Link) {
    tracing::warn!("a second connection to the broker socket was refused: one wrapper at a time");
    let _ = tokio::time::timeout(HELLO_TIMEOUT, async {
        let _ = link.recv::<Request>().await;
        link.send(&Reply::Busy).await
    })
    .await;
}

/// One wrapper's session: hello, connect to the broker, then serve it until it goes.
async fn run_session(
    consume: ConsumeArgs,
    setup: Result<(BrokerUri, String), String>,
    log_path: PathBuf,
    mut link: Link,
    stopped: watch::Receiver<bool>,
) {
    match tokio::time::timeout(HELLO_TIMEOUT, link.recv::<Request>()).await {
        Ok(Ok(Some(Request::Hello { version }))) if version == PROTOCOL_VERSION => {}
        Ok(Ok(Some(Request::Hello { version }))) => {
            let reason = format!(
                "the wrapper speaks protocol {version}, the sidecar {PROTOCOL_VERSION}: use one version of testrunner-operator for both"
            );
            tracing::error!("{reason}");
            let _ = link.send(&Reply::Misconfigured { reason }).await;
            return;
        }
        other => {
            tracing::warn!(?other, "a connection did not say hello; closed");
            return;
        }
    }
    let (uri, queue) = match setup {
        Ok(s) => s,
        Err(reason) => {
            let _ = link.send(&Reply::Misconfigured { reason }).await;
            return;
        }
    };
    let log = TerminationLog::new(log_path);
    let worker = super::Worker::start(
        consume,
        queue,
        uri,
        None,
        log,
        super::Stops::flag(stopped),
        super::Runner::Remote(link),
    )
    .await;
    match worker {
        Ok(mut worker) => {
            if let super::Runner::Remote(link) = &mut worker.runner
                && link.send(&Reply::Ready).await.is_err()
            {
                worker.close().await;
                return;
            }
            if let Err(why) = worker.report_state(None).await {
                worker
                    .broker_lost(format!("cannot report the worker's state: {why}"))
                    .await;
                return;
            }
            worker.consume().await;
        }
        Err((mut runner, why)) => {
            if let super::Runner::Remote(link) = &mut runner {
                let _ = link.send(&Reply::Unavailable { reason: why }).await;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The wrapper's side
// ---------------------------------------------------------------------------

/// Runs the wrapper against the sidecar at `socket`; the returned code is the process
/// exit status.
pub(super) async fn run_client(
    args: &WorkerArgs,
    socket: &Path,
    codes: FailureCodes,
    mut log: TerminationLog,
    mut signals: Signals,
) -> u8 {
    let unavailable = |log: &mut TerminationLog, why: String| {
        tracing::error!(socket = %socket.display(), "cannot start consuming: {why}");
        log.write(&TerminationLine::BrokerUnavailable(why));
        WorkerExit::BrokerUnavailable.code()
    };
    // The sidecar may still be starting.
    let deadline = Instant::now() + BROKER_TIMEOUT;
    let link = loop {
        let mut link = loop {
            match connect(socket).await {
                Ok(link) => break link,
                Err(e) if Instant::now() >= deadline => {
                    return unavailable(
                        &mut log,
                        format!(
                            "no broker sidecar answers at {} within {BROKER_TIMEOUT:?}: {e}",
                            socket.display()
                        ),
                    );
                }
                Err(_) => {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                        sig = signals.recv() => {
                            tracing::info!(signal = %sig, "stopping before the first ticket");
                            return 0;
                        }
                    }
                }
            }
        };
        let hello = async {
            link.send(&Request::Hello {
                version: PROTOCOL_VERSION,
            })
            .await?;
            link.recv::<Reply>().await
        };
        let answer = tokio::select! {
            a = tokio::time::timeout(BROKER_TIMEOUT + HELLO_TIMEOUT, hello) => a,
            sig = signals.recv() => {
                tracing::info!(signal = %sig, "stopping before the first ticket");
                return 0;
            }
        };
        match answer {
            Ok(Ok(Some(Reply::Ready))) => break link,
            Ok(Ok(Some(Reply::Unavailable { reason }))) => return unavailable(&mut log, reason),
            Ok(Ok(Some(Reply::Misconfigured { reason }))) => {
                tracing::error!("the broker sidecar is misconfigured: {reason}");
                log.write(&TerminationLine::ConfigError(reason));
                return WorkerExit::Config.code();
            }
            // The session of a wrapper that has just ended (a crash, then an immediate
            // container restart) may still be giving its ticket back: ask again.
            Ok(Ok(Some(Reply::Busy))) if Instant::now() < deadline => {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    sig = signals.recv() => {
                        tracing::info!(signal = %sig, "stopping before the first ticket");
                        return 0;
                    }
                }
                continue;
            }
            Ok(Ok(Some(Reply::Busy))) => {
                return unavailable(&mut log, "the broker sidecar serves another wrapper".into());
            }
            Ok(Ok(other)) => {
                return unavailable(
                    &mut log,
                    format!("unexpected answer from the broker sidecar: {other:?}"),
                );
            }
            Ok(Err(e)) => {
                return unavailable(&mut log, format!("the broker sidecar failed: {e}"));
            }
            Err(_) => {
                return unavailable(&mut log, "no answer from the broker sidecar in time".into());
            }
        }
    };
    tracing::info!(socket = %socket.display(), "consuming through the broker sidecar, one ticket at a time");
    log.write(&TerminationLine::Idle);

    let mut client = Client {
        args,
        codes,
        log,
        signals,
        link,
        stopping: false,
    };
    client.serve().await
}

/// The wrapper's loop against the sidecar.
struct Client<'a> {
    args: &'a WorkerArgs,
    codes: FailureCodes,
    log: TerminationLog,
    signals: Signals,
    link: Link,
    stopping: bool,
}

impl Client<'_> {
    async fn serve(&mut self) -> u8 {
        loop {
            if let Err(e) = self.link.send(&Request::Next).await {
                return self.lost(format!("the broker sidecar went away: {e}"));
            }
            let reply = match self.wait_for_ticket().await {
                Ok(r) => r,
                Err(code) => return code,
            };
            match reply {
                Reply::Ticket { id, delivery, env } => {
                    if let Some(code) = self.ticket(id, delivery, env).await {
                        return code;
                    }
                }
                Reply::Stopped => {
                    tracing::info!("the broker sidecar stopped: no ticket in hand");
                    return 0;
                }
                Reply::BrokerLost { reason } => return self.lost(reason),
                other => {
                    return self.lost(format!(
                        "unexpected answer from the broker sidecar: {other:?}"
                    ));
                }
            }
        }
    }

    /// Waits for the answer to `Next`, asking the sidecar to stop on a signal or at the
    /// idle deadline. A ticket that was already on its way is still run.
    async fn wait_for_ticket(&mut self) -> Result<Reply, u8> {
        let idle_until = self.args.idle_exit.map(|d| Instant::now() + d);
        let idle_deadline = async {
            match idle_until {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            reply = self.link.recv::<Reply>() => return self.answer(reply),
            sig = self.signals.recv() => {
                tracing::info!(signal = %sig, "stopping: no ticket in hand");
            }
            _ = idle_deadline => {
                tracing::info!("no ticket for the --idle-exit period: stopping");
            }
        }
        self.stopping = true;
        if let Err(e) = self.link.send(&Request::Stop).await {
            return Err(self.lost(format!("the broker sidecar went away: {e}")));
        }
        let reply = self.link.recv::<Reply>().await;
        self.answer(reply)
    }

    fn answer(&mut self, reply: std::io::Result<Option<Reply>>) -> Result<Reply, u8> {
        match reply {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(self.lost("the broker sidecar closed the connection".into())),
            Err(e) => Err(self.lost(format!("the broker sidecar failed: {e}"))),
        }
    }

    /// Runs one ticket. `None`: go on; else the exit code.
    async fn ticket(
        &mut self,
        id: String,
        delivery: u64,
        env: Vec<(String, String)>,
    ) -> Option<u8> {
        self.log.write(&TerminationLine::Ticket {
            id: id.clone(),
            delivery,
        });
        let body = match self.link.recv_body().await {
            Ok(b) => b,
            Err(e) => return Some(self.lost(format!("the broker sidecar failed: {e}"))),
        };
        tracing::info!(ticket = %id, delivery, bytes = body.len(), "ticket received");
        let mut running = match Running::start(&self.args.command, env, body) {
            Ok(r) => r,
            Err(why) => {
                // Leaving the session gives the ticket back.
                tracing::error!(ticket = %id, "{why}; giving the ticket back");
                self.log.write(&TerminationLine::CommandError(why));
                return Some(WorkerExit::CommandNotStarted.code());
            }
        };
        let started = Instant::now();
        let mut forwarded = None;
        let exit = loop {
            tokio::select! {
                exit = running.wait() => break exit,
                sig = self.signals.recv() => {
                    if self.stopping {
                        tracing::warn!(ticket = %id, signal = %sig, "second stop signal: forwarding it to the command; the ticket stays unacked");
                        running.signal(sig);
                        forwarded = Some(sig);
                    } else {
                        tracing::info!(ticket = %id, signal = %sig, "stopping after this ticket");
                        self.stopping = true;
                        // The sidecar stops consuming now, so that no ticket waits on a
                        // worker that is going away.
                        if let Err(e) = self.link.send(&Request::Stop).await {
                            tracing::warn!(error = %e, "cannot tell the broker sidecar to stop");
                        }
                    }
                }
                reply = self.link.recv::<Reply>() => {
                    let why = match reply {
                        Ok(Some(Reply::BrokerLost { reason })) => reason,
                        Ok(Some(other)) => format!("unexpected answer from the broker sidecar: {other:?}"),
                        Ok(None) => "the broker sidecar closed the connection".into(),
                        Err(e) => format!("the broker sidecar failed: {e}"),
                    };
                    tracing::error!(ticket = %id, "broker access lost ({why}); stopping the command, the ticket goes back to the queue");
                    running.stop().await;
                    return Some(self.lost(why));
                }
            }
        };
        let elapsed = started.elapsed();
        if let Some(sig) = forwarded {
            tracing::warn!(ticket = %id, ?exit, "command stopped by a forwarded signal; ticket left unacked");
            return Some(128 + sig as u8);
        }
        match verdict(exit, &self.codes) {
            Verdict::Ack => {
                let done = Request::Done {
                    exit,
                    elapsed_ms: elapsed.as_millis() as u64,
                };
                if let Err(e) = self.link.send(&done).await {
                    return Some(self.lost(format!("cannot ack ticket {id}: {e}")));
                }
                match self.link.recv::<Reply>().await {
                    Ok(Some(Reply::Acked)) => {}
                    Ok(Some(Reply::BrokerLost { reason })) => {
                        return Some(self.lost(format!("cannot ack ticket {id}: {reason}")));
                    }
                    other => {
                        return Some(self.lost(format!(
                            "cannot ack ticket {id}: the broker sidecar answered {other:?}"
                        )));
                    }
                }
                self.log.write(&TerminationLine::Idle);
                tracing::info!(ticket = %id, delivery, ?exit, ?elapsed, "ticket done and acked");
                if self.stopping {
                    return Some(0);
                }
                None
            }
            Verdict::Crash(code) => {
                tracing::error!(ticket = %id, delivery, ?exit, ?elapsed, "command crashed; ticket left unacked");
                Some(code)
            }
        }
    }

    fn lost(&mut self, why: String) -> u8 {
        tracing::error!("broker connection lost: {why}");
        self.log.write(&TerminationLine::BrokerLost(why));
        WorkerExit::BrokerLost.code()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_back_as_written() {
        let messages = [
            Request::Hello { version: 1 },
            Request::Next,
            Request::Done {
                exit: Exit::Signal(9),
                elapsed_ms: 12,
            },
            Request::Stop,
        ];
        for m in messages {
            let text = serde_json::to_string(&m).unwrap();
            assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), m, "{text}");
        }
        let ticket = Reply::Ticket {
            id: "t-1".into(),
            delivery: 2,
            env: vec![("TICKET_ID".into(), "t-1".into())],
        };
        let text = serde_json::to_string(&ticket).unwrap();
        assert_eq!(
            text,
            r#"{"reply":"ticket","id":"t-1","delivery":2,"env":[["TICKET_ID","t-1"]]}"#
        );
        assert_eq!(serde_json::from_str::<Reply>(&text).unwrap(), ticket);
    }

    #[tokio::test]
    async fn sockets_deep_in_the_filesystem_are_still_served() {
        let mut dir = std::env::temp_dir().join(format!("trw-deep-{}", std::process::id()));
        let top = dir.clone();
        while dir.as_os_str().len() < 150 {
            dir.push("a-rather-long-directory-name");
        }
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("broker.sock");
        let (at, _dir) = addressable(&path).unwrap();
        assert!(at.as_os_str().len() < 108, "{}", at.display());
        let listener = UnixListener::bind(&at).unwrap();
        assert!(path.exists(), "the socket is at its real path");
        let (client, server) = tokio::join!(connect(&path), listener.accept());
        let (mut client, mut server) = (client.unwrap(), Link::new(server.unwrap().0));
        client.send(&Request::Next).await.unwrap();
        assert_eq!(server.recv::<Request>().await.unwrap(), Some(Request::Next));
        std::fs::remove_dir_all(top).unwrap();
    }

    #[tokio::test]
    async fn frames_carry_messages_and_raw_bodies() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Link::new(a), Link::new(b));
        let body: Vec<u8> = (0..=255u8).cycle().take(3 * 1024 * 1024).collect();
        let ticket = Reply::Ticket {
            id: "big".into(),
            delivery: 1,
            env: Vec::new(),
        };
        let send = a.send_ticket(ticket.clone(), body.clone());
        let recv = async {
            let got = b.recv::<Reply>().await.unwrap().unwrap();
            (got, b.recv_body().await.unwrap())
        };
        let (sent, (got, got_body)) = tokio::join!(send, recv);
        sent.unwrap();
        assert_eq!(got, ticket);
        assert_eq!(got_body, body);
        drop(a);
        assert!(
            b.recv::<Reply>().await.unwrap().is_none(),
            "EOF reads as None"
        );
    }
}

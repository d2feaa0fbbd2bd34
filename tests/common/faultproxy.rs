//! A TCP proxy on loopback that injects network faults between the daemon
//! and Postgres:
//! - [`Fault::None`]: forwards both ways;
//! - [`Fault::Blackhole`]: accepts connections but forwards nothing in
//!   either direction, and closes nothing (a silent network);
//! - [`Fault::Refuse`]: stops listening, so new connections are refused;
//! - [`FaultProxy::cut`]: closes every open connection at once.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    Blackhole,
    Refuse,
}

#[derive(Debug, Clone, Copy)]
struct State {
    fault: Fault,
    /// Connections opened before the latest cut end.
    epoch: u64,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    state: Arc<watch::Sender<State>>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// A proxy on an ephemeral loopback port forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (state, _) = watch::channel(State {
            fault: Fault::None,
            epoch: 0,
        });
        let state = Arc::new(state);
        let accept = tokio::spawn(accept_loop(listener, addr, upstream, state.clone()));
        Self {
            addr,
            state,
            accept,
        }
    }

    pub fn set(&self, fault: Fault) {
        self.state.send_modify(|s| s.fault = fault);
    }

    /// Closes every open connection; new ones are served as the current
    /// fault says.
    pub fn cut(&self) {
        self.state.send_modify(|s| s.epoch += 1);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Open connections end when their tasks see the sender go away.
    }
}

async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    upstream: SocketAddr,
    state: Arc<watch::Sender<State>>,
) {
    let mut listener = Some(listener);
    let mut changes = state.subscribe();
    loop {
        let fault = changes.borrow_and_update().fault;
        if fault == Fault::Refuse {
            // Not listening: connecting is refused by the kernel.
            listener = None;
            if changes.changed().await.is_err() {
                return;
            }
            continue;
        }
        let bound = match listener.take() {
            Some(bound) => bound,
            None => TcpListener::bind(addr)
                .await
                .expect("rebinds the proxy port"),
        };
        let accepted = tokio::select! {
            accepted = bound.accept() => accepted,
            changed = changes.changed() => {
                listener = Some(bound);
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        listener = Some(bound);
        let Ok((client, _)) = accepted else { continue };
        tokio::spawn(serve(client, upstream, state.subscribe()));
    }
}

/// One connection: waits out a blackhole before connecting upstream, then
/// pumps bytes both ways while the proxy forwards.
async fn serve(mut client: TcpStream, upstream: SocketAddr, mut state: watch::Receiver<State>) {
    let epoch = state.borrow().epoch;
    let mut server: Option<TcpStream> = None;
    let mut up = vec![0u8; 16 * 1024];
    let mut down = vec![0u8; 16 * 1024];
    loop {
        let now = *state.borrow_and_update();
        if now.epoch != epoch {
            return;
        }
        if now.fault == Fault::Blackhole {
            // Hold both sockets, read nothing, send nothing.
            if state.changed().await.is_err() {
                return;
            }
            continue;
        }
        let server_stream = match server.as_mut() {
            Some(stream) => stream,
            None => match TcpStream::connect(upstream).await {
                Ok(stream) => server.insert(stream),
                Err(_) => return,
            },
        };
        tokio::select! {
            read = client.read(&mut up) => match read {
                Ok(n) if n > 0 => {
                    if server_stream.write_all(&up[..n]).await.is_err() {
                        return;
                    }
                }
                _ => return,
            },
            read = server_stream.read(&mut down) => match read {
                Ok(n) if n > 0 => {
                    if client.write_all(&down[..n]).await.is_err() {
                        return;
                    }
                }
                _ => return,
            },
            changed = state.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

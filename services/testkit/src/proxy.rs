use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};
use tokio_util::sync::CancellationToken;

/// A TCP proxy in front of a real server. [`TcpProxy::cut`] drops every connection and refuses
/// new ones until [`TcpProxy::restore`]: an outage of that server for the code under test only.
pub struct TcpProxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    generation: Arc<std::sync::Mutex<CancellationToken>>,
    stop: CancellationToken,
}

impl TcpProxy {
    /// Starts a proxy on 127.0.0.1 (random port) forwarding to `target` (`host:port`).
    pub async fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a port for the TCP proxy");
        let addr = listener.local_addr().expect("proxy address");
        let up = Arc::new(AtomicBool::new(true));
        let generation = Arc::new(std::sync::Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let target = target.to_owned();
        {
            let up = up.clone();
            let generation = generation.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    let accepted = tokio::select! {
                        _ = stop.cancelled() => return,
                        accepted = listener.accept() => accepted,
                    };
                    let Ok((client, _)) = accepted else { continue };
                    // Checked under the lock `cut` holds: a connection accepted during a cut
                    // is refused, never given the next generation's token.
                    let cut = match generation.lock() {
                        Ok(g) if up.load(Ordering::SeqCst) => g.clone(),
                        _ => {
                            drop(client);
                            continue;
                        }
                    };
                    let target = target.clone();
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(&target).await else {
                            return;
                        };
                        let (client_read, client_write) = client.into_split();
                        let (server_read, server_write) = server.into_split();
                        tokio::select! {
                            biased;
                            _ = cut.cancelled() => {}
                            _ = async {
                                tokio::join!(
                                    forward(client_read, server_write, &cut),
                                    forward(server_read, client_write, &cut)
                                )
                            } => {}
                        }
                    });
                }
            });
        }
        Self {
            addr,
            up,
            generation,
            stop,
        }
    }

    /// `127.0.0.1:<port>` of the proxy.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops all open connections and refuses new ones.
    pub fn cut(&self) {
        let generation = self.generation.lock();
        self.up.store(false, Ordering::SeqCst);
        if let Ok(mut g) = generation {
            g.cancel();
            *g = CancellationToken::new();
        }
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        let _generation = self.generation.lock();
        self.up.store(true, Ordering::SeqCst);
    }
}

/// Copies one direction until its reader closes, then closes the writer's side (a half-close
/// passes through; the other direction goes on). The cut is checked after every read, before
/// the write: bytes written after a cut (an ack sent right after the commit hook cut the
/// broker) are read only after the cut was made, so they are dropped, never forwarded, even
/// when the writer runs on another thread than this task.
async fn forward(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, cut: &CancellationToken) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(read) => read,
        };
        if cut.is_cancelled() {
            return;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut();
    }
}

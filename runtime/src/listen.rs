//! The accept loop: every connection on its own task, with a cap on how many are open, a
//! deadline for each request's headers (idle keep-alive connections included) and graceful
//! shutdown. Idle or half-sent connections are closed when their deadline passes, and those
//! beyond the cap are closed at once, so they cannot use up the process's file descriptors
//! and lock `/health` out.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Limits on connections.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, counted from when the connection is
    /// ready for one (after accept, and after each response on a kept-alive connection).
    pub header_timeout: Duration,
}

/// File descriptors kept free of connections: the model, its libraries, logs, the kb.
const RESERVED_FDS: u64 = 64;

/// Raises this process's soft limit on open files to its hard limit, and returns the soft
/// limit now in force (`None` if the system does not say).
pub fn raise_fd_limit() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the plain struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return None;
        }
        if r.rlim_cur < r.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                r.rlim_cur = r.rlim_max;
            }
        }
    }
    Some(r.rlim_cur)
}

/// The connection cap when none is asked for: 1024, or fewer when the file limit is low.
pub fn default_max_connections(fd_limit: Option<u64>) -> usize {
    let fit = fd_limit.map_or(1024, |l| l.saturating_sub(RESERVED_FDS).max(8));
    fit.min(1024) as usize
}

/// Serves `app` on `listener` until `shutdown` completes, then lets open requests finish.
/// `refused` counts connections closed for being over the cap.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    refused: Arc<AtomicU64>,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors (or another transient error): back off a
                    // little rather than spin; the deadlines free descriptors.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            refused.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            // Errors here are a client's (a header deadline passed, a reset): nothing to
            // report beyond closing the connection.
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    // Requests in flight finish (a stream to its end); at most a minute.
    let _ = tokio::time::timeout(Duration::from_secs(60), graceful.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_cap_leaves_descriptors_for_the_model_under_a_low_file_limit() {
        assert_eq!(default_max_connections(None), 1024);
        assert_eq!(default_max_connections(Some(1 << 20)), 1024);
        assert_eq!(default_max_connections(Some(1024)), 960);
        assert_eq!(default_max_connections(Some(256)), 192);
        assert_eq!(default_max_connections(Some(10)), 8);
    }
}

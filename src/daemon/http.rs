//! The operator's HTTP listener: `/metrics` (Prometheus), `/health`, and the self-test page at
//! `/`. A deliberately small HTTP/1.1 server: GET and HEAD only, one request per connection,
//! bounded request size, bounded time, bounded number of connections.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use super::{Status, metrics};
use crate::net::{Handle, Snapshot};

/// Largest request head read; beyond it the answer is 431.
const MAX_REQUEST: usize = 8192;
/// A client must send its request and take the answer within this time.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 32;
/// How long a driver may take to answer before `/health` reports it unhealthy.
const DRIVER_TIMEOUT: Duration = Duration::from_secs(2);

/// What the HTTP listener serves from.
pub struct Site {
    /// Every driver of the process.
    pub drivers: Vec<Handle>,
    pub status: Arc<Status>,
    /// The self-test page, ready to send.
    pub page: String,
}

impl Site {
    /// The snapshot summed over every driver; `None` if one did not answer in time.
    async fn snapshot(&self) -> Option<Snapshot> {
        let mut total = Snapshot::default();
        for d in &self.drivers {
            let s = tokio::time::timeout(DRIVER_TIMEOUT, d.snapshot())
                .await
                .ok()??;
            total.add(&s);
        }
        Some(total)
    }

    async fn healthy(&self) -> bool {
        for d in &self.drivers {
            if !matches!(
                tokio::time::timeout(DRIVER_TIMEOUT, d.ping()).await,
                Ok(true)
            ) {
                return false;
            }
        }
        true
    }
}

/// Serves HTTP on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, site: Rc<Site>) {
    let active = Rc::new(Cell::new(0usize));
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "http accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if active.get() >= MAX_CONNECTIONS {
            debug!(%remote, "http connection refused: too many at once");
            continue;
        }
        active.set(active.get() + 1);
        let (site, active) = (site.clone(), active.clone());
        tokio::task::spawn_local(async move {
            if tokio::time::timeout(REQUEST_TIMEOUT, exchange(stream, &site))
                .await
                .is_err()
            {
                debug!(%remote, "http request timed out");
            }
            active.set(active.get() - 1);
        });
    }
}

/// A parsed request line.
#[derive(Debug, PartialEq, Eq)]
enum Request<'a> {
    Get { path: &'a str, head: bool },
    BadMethod,
    Malformed,
}

/// Parses the head of a request (everything up to the blank line).
fn parse(head: &[u8]) -> Request<'_> {
    let Ok(text) = std::str::from_utf8(head) else {
        return Request::Malformed;
    };
    let line = text.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Request::Malformed;
    };
    if parts.next().is_some() || !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Request::Malformed;
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    match method {
        "GET" => Request::Get { path, head: false },
        "HEAD" => Request::Get { path, head: true },
        _ => Request::BadMethod,
    }
}

async fn exchange(mut stream: TcpStream, site: &Site) {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut filled = 0;
    let end = loop {
        if let Some(i) = buf[..filled].windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if filled == buf.len() {
            let _ = respond(
                &mut stream,
                431,
                "text/plain",
                b"request too large\n",
                false,
            )
            .await;
            return;
        }
        match stream.read(&mut buf[filled..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => filled += n,
        }
    };
    let (path, head) = match parse(&buf[..end]) {
        Request::Get { path, head } => (path, head),
        Request::BadMethod => {
            let _ = respond(&mut stream, 405, "text/plain", b"GET or HEAD only\n", false).await;
            return;
        }
        Request::Malformed => {
            let _ = respond(&mut stream, 400, "text/plain", b"bad request\n", false).await;
            return;
        }
    };
    let result = match path {
        "/metrics" => match site.snapshot().await {
            Some(s) => {
                let body = metrics::render(&s, &site.status);
                respond(
                    &mut stream,
                    200,
                    "text/plain; version=0.0.4; charset=utf-8",
                    body.as_bytes(),
                    head,
                )
                .await
            }
            None => {
                respond(
                    &mut stream,
                    503,
                    "text/plain",
                    b"a relay thread did not answer\n",
                    head,
                )
                .await
            }
        },
        "/health" => {
            if site.healthy().await {
                respond(&mut stream, 200, "text/plain", b"ok\n", head).await
            } else {
                respond(
                    &mut stream,
                    503,
                    "text/plain",
                    b"a relay thread did not answer\n",
                    head,
                )
                .await
            }
        }
        "/" | "/index.html" => {
            respond(
                &mut stream,
                200,
                "text/html; charset=utf-8",
                site.page.as_bytes(),
                head,
            )
            .await
        }
        _ => respond(&mut stream, 404, "text/plain", b"not found\n", head).await,
    };
    if let Err(e) = result {
        debug!(error = %e, "http write failed");
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
    head_only: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let allow = if status == 405 {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let header = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         {allow}Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\
         Referrer-Policy: no-referrer\r\nX-Frame-Options: DENY\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(header.as_bytes()).await?;
    if !head_only {
        stream.write_all(body).await?;
    }
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        assert_eq!(
            parse(b"GET /metrics HTTP/1.1\r\nHost: x"),
            Request::Get {
                path: "/metrics",
                head: false
            }
        );
        assert_eq!(
            parse(b"HEAD /?a=b HTTP/1.0"),
            Request::Get {
                path: "/",
                head: true
            }
        );
        assert_eq!(parse(b"POST / HTTP/1.1"), Request::BadMethod);
        assert_eq!(parse(b"GET metrics HTTP/1.1"), Request::Malformed);
        assert_eq!(parse(b"GET / SPDY/3"), Request::Malformed);
        assert_eq!(parse(b"GET / HTTP/1.1 extra"), Request::Malformed);
        assert_eq!(parse(b"\xff\xfe"), Request::Malformed);
        assert_eq!(parse(b""), Request::Malformed);
    }
}

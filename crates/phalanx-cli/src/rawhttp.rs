//! A minimal HTTP/1.1 client for the overload generator: keep-alive
//! connections to one address, a request written as prepared bytes, an
//! answer read as far as its status and its `Content-Length` body. It costs
//! a few microseconds a request where a general client costs tens, so the
//! generator, sharing the machine with the nodes, can offer more load and
//! adds less of its own queueing to the latencies it measures.
//! Only for answers with a `Content-Length` (all of Phalanx's are).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An answer's head larger than this is refused as malformed.
const HEAD_BYTES_MAX: usize = 16 * 1024;
/// An answer's body larger than this is refused as malformed.
const BODY_BYTES_MAX: usize = 1 << 20;

/// Keep-alive connections to one address, at most `open_max` open at once.
pub struct Pool {
    addr: SocketAddr,
    idle: Mutex<Vec<TcpStream>>,
    open: AtomicUsize,
    open_max: usize,
}

/// Why a request got no answer.
#[derive(Debug)]
pub enum Failure {
    /// Every connection the pool may open is busy.
    PoolFull,
    Io(std::io::Error),
    Malformed(&'static str),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::PoolFull => write!(f, "every connection of the pool is busy"),
            Failure::Io(error) => write!(f, "{error}"),
            Failure::Malformed(what) => write!(f, "malformed answer: {what}"),
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(error: std::io::Error) -> Failure {
        Failure::Io(error)
    }
}

/// Gives a connection's slot back when the request that held it ends, however it ends.
struct Slot<'a>(&'a Pool);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    pub fn new(addr: SocketAddr, open_max: usize) -> Pool {
        Pool { addr, idle: Mutex::new(Vec::new()), open: AtomicUsize::new(0), open_max }
    }

    /// Sends `POST path` with a JSON `body` and `extra_headers` (each line
    /// ending in `\r\n`); returns the answer's status.
    pub async fn post(&self, path: &str, extra_headers: &str, body: &[u8]) -> Result<u16, Failure> {
        let idle = self.idle.lock().expect("pool lock").pop();
        let (mut stream, slot) = match idle {
            Some(stream) => (stream, Slot(self)),
            None => {
                if self.open.fetch_add(1, Ordering::Relaxed) >= self.open_max {
                    self.open.fetch_sub(1, Ordering::Relaxed);
                    return Err(Failure::PoolFull);
                }
                let slot = Slot(self);
                let stream = TcpStream::connect(self.addr).await?;
                stream.set_nodelay(true)?;
                (stream, slot)
            }
        };
        let mut request = Vec::with_capacity(160 + extra_headers.len() + body.len());
        request.extend_from_slice(b"POST ");
        request.extend_from_slice(path.as_bytes());
        request.extend_from_slice(b" HTTP/1.1\r\nhost: phalanx\r\ncontent-type: application/json\r\n");
        request.extend_from_slice(extra_headers.as_bytes());
        request.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
        request.extend_from_slice(body);
        stream.write_all(&request).await?;
        let (status, keep_alive) = read_answer(&mut stream).await?;
        if keep_alive {
            // The slot stays taken while the connection is idle in the pool.
            std::mem::forget(slot);
            self.idle.lock().expect("pool lock").push(stream);
        }
        Ok(status)
    }
}

/// Reads one answer; returns its status and whether the connection may be reused.
async fn read_answer(stream: &mut TcpStream) -> Result<(u16, bool), Failure> {
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if buffer.len() > HEAD_BYTES_MAX {
            return Err(Failure::Malformed("answer head too large"));
        }
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Err(Failure::Malformed("connection closed before the answer's head ended"));
        }
        buffer.extend_from_slice(&chunk[..read]);
    };
    let head = std::str::from_utf8(&buffer[..head_end]).map_err(|_| Failure::Malformed("answer head not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or(Failure::Malformed("no status line"))?;
    let mut length = None;
    let mut keep_alive = true;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<usize>().ok();
        } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
            keep_alive = false;
        }
    }
    let length = length.ok_or(Failure::Malformed("answer without content-length"))?;
    if length > BODY_BYTES_MAX {
        return Err(Failure::Malformed("answer body too large"));
    }
    let mut have = buffer.len() - head_end;
    while have < length {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Err(Failure::Malformed("connection closed inside the answer's body"));
        }
        have += read;
    }
    if have > length {
        return Err(Failure::Malformed("more bytes than the answer's content-length"));
    }
    Ok((status, keep_alive))
}

//! Stdio streams: the attach handshake on a stdio connection, then one copy
//! loop per stream on that connection's thread.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use proto::agent::{StreamAttach, StreamAttached, StreamKind};
use proto::{read_frame, write_frame};

use crate::conn::{Conn, Listener};
use crate::error::AgentError;
use crate::supervisor::{Attachment, Process, Supervisor};
use crate::{log_debug, log_error};

/// Bytes moved per splice(2) call: a whole default pipe buffer.
const SPLICE_CHUNK: usize = 64 * 1024;
/// Buffer of the read/write copies (stdin, pty output).
const COPY_BUF: usize = 16 * 1024;

/// Accepts stdio connections forever; returns only if accepting fails for
/// good.
pub fn serve(supervisor: Arc<Supervisor>, listener: Listener) -> io::Error {
    crate::agent::accept_loop(&listener, "stdio", move |conn| {
        let supervisor = Arc::clone(&supervisor);
        move || handle_connection(&supervisor, conn)
    })
}

fn handle_connection(supervisor: &Supervisor, conn: Conn) {
    let conn = Arc::new(conn);
    // Unbuffered: the raw stream bytes that follow must stay in the socket.
    let attach: StreamAttach = match read_frame(&mut &*conn) {
        Ok(Some(attach)) => attach,
        Ok(None) => return,
        Err(e) => {
            log_debug!("dropping stdio connection: {e}");
            return;
        }
    };
    let attached = match StreamKind::try_from(attach.kind) {
        Ok(kind) => supervisor.attach(&attach.process_id, kind, &conn),
        Err(_) => Err(AgentError::InvalidArgument(format!(
            "unknown stream kind {}",
            attach.kind
        ))),
    };
    let reply = StreamAttached {
        error: attached.as_ref().err().map(AgentError::to_wire),
    };
    if let Err(e) = write_frame(&mut &*conn, &reply) {
        // Still run the copy below: it notices the dead stream and keeps
        // the process's state consistent.
        log_debug!("stdio attach reply: {e}");
    }
    match attached {
        Ok((process, Attachment::Stdin(dst))) => {
            copy_stdin(&conn, dst);
            process.stdin_done();
        }
        Ok((process, Attachment::Output { src, pipe })) => copy_output(src, &conn, pipe, &process),
        Err(e) => log_debug!("stdio attach refused: {e}"),
    }
}

/// Host -> process until the stream ends or the process stops reading;
/// dropping `dst` then gives the process EOF.
fn copy_stdin(conn: &Conn, mut dst: File) {
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        match (&*conn).read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if dst.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Process -> host until EOF, then shuts the stream's write side and tells
/// the process (so `wait` can answer). If the host stops reading, the rest is
/// discarded so the process is not killed by SIGPIPE.
fn copy_output(src: File, conn: &Conn, pipe: bool, process: &Process) {
    let mut sink_ok = true;
    let mut done = false;
    if pipe {
        // Pipe -> socket without copying through user space.
        loop {
            // SAFETY: splice(2) between two fds we hold; no user memory.
            let n = unsafe {
                libc::splice(
                    src.as_raw_fd(),
                    std::ptr::null_mut(),
                    conn.as_raw_fd(),
                    std::ptr::null_mut(),
                    SPLICE_CHUNK,
                    libc::SPLICE_F_MOVE,
                )
            };
            if n > 0 {
                continue;
            }
            if n == 0 {
                done = true;
                break;
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => {}
                // This socket family cannot splice: copy through a buffer.
                Some(libc::EINVAL) => break,
                _ => {
                    sink_ok = false;
                    break;
                }
            }
        }
    }
    if !done {
        let mut buf = vec![0u8; COPY_BUF];
        loop {
            match (&src).read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if sink_ok && (&*conn).write_all(&buf[..n]).is_err() {
                        sink_ok = false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A pty master reports EIO once every slave fd is closed.
                Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
                Err(e) => {
                    log_error!("reading output: {e}");
                    break;
                }
            }
        }
    }
    let _ = conn.shutdown(std::net::Shutdown::Write);
    process.output_done();
}

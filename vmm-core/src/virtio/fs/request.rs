//! One FUSE request: a descriptor chain in, a reply written back into it.
//!
//! It exists to keep the guest-facing parsing in one place. The chain's
//! device-readable descriptors hold the request (`fuse_in_header` and its
//! arguments), its device-writable ones receive the reply. fuse-backend-rs
//! checks every descriptor against guest memory while building the
//! reader and writer, and its server does not trust the request's contents;
//! whatever fails is an error value for the caller to log, never a panic.
//!
//! The read-only policy lives here too: fuse-backend-rs's passthrough file
//! system has no read-only mode, so a read-only device answers every request
//! that could change the host directory with `EROFS` before it reaches the
//! file system. It is an allow-list: opcodes it does not know are refused.

use std::mem::size_of;

use fuse_backend_rs::abi::fuse_abi::{AccessIn, InHeader, Opcode, OpenIn, OutHeader};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress};

use super::device::SharedFs;
use crate::virtio::GuestMemory;

/// Why a request got no reply.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// A descriptor lies outside guest memory, or the chain is malformed.
    #[error("bad descriptor chain: {0}")]
    Chain(fuse_backend_rs::transport::Error),
    /// The request could not be decoded or its reply not written.
    #[error("FUSE request failed: {0}")]
    Server(fuse_backend_rs::Error),
    /// The `EROFS` reply could not be written.
    #[error("cannot write the EROFS reply: {0}")]
    Reply(std::io::Error),
}

/// A request that was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Served {
    /// Bytes of reply written (0 for requests without a reply, such as
    /// FORGET).
    pub len: u32,
    /// The request's FUSE opcode, if its header decoded. The device uses it
    /// to know whether a FUSE session is open (see
    /// [`VirtioFs::has_fuse_session`](super::VirtioFs::has_fuse_session)).
    pub opcode: Option<u32>,
    /// Whether the reply carries an error number (`fuse_out_header.error`
    /// non-zero), for the device's counters.
    pub error: bool,
}

/// Serves the request in `chain`.
pub fn handle_chain(
    server: &fuse_backend_rs::api::server::Server<SharedFs>,
    read_only: bool,
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
) -> Result<Served, RequestError> {
    let reader = Reader::from_descriptor_chain(mem, chain.clone()).map_err(RequestError::Chain)?;
    let opcode = reader
        .clone()
        .read_obj::<InHeader>()
        .ok()
        .map(|header| header.opcode);
    let header = reply_header_addr(&chain);
    let mut writer = VirtioFsWriter::new(mem, chain).map_err(RequestError::Chain)?;
    if read_only {
        if let Some(unique) = refused_when_read_only(&reader) {
            let reply = OutHeader {
                len: size_of::<OutHeader>() as u32,
                error: -libc::EROFS,
                unique,
            };
            writer.write_obj(reply).map_err(RequestError::Reply)?;
            return Ok(Served {
                len: reply.len,
                opcode,
                error: true,
            });
        }
    }
    let written = server
        .handle_message(reader, Writer::from(writer), None, None)
        .map_err(RequestError::Server)?;
    // A reply never exceeds the chain's writable bytes, which the queue
    // bounds to far less than 4 GiB; saturate rather than trust that.
    Ok(Served {
        len: u32::try_from(written).unwrap_or(u32::MAX),
        opcode,
        error: written >= size_of::<OutHeader>() && reply_is_error(mem, header),
    })
}

/// Where the reply's `fuse_out_header` goes: the chain's first
/// device-writable descriptor, if it holds a whole header (Linux gives the
/// header a descriptor of its own).
fn reply_header_addr(chain: &DescriptorChain<&GuestMemory>) -> Option<GuestAddress> {
    chain
        .clone()
        .writable()
        .next()
        .filter(|d| d.len() as usize >= size_of::<OutHeader>())
        .map(|d| d.addr())
}

/// Whether the reply header the server just wrote at `header` holds an
/// error. fuse-backend-rs does not hand the header back, so it is read
/// from guest memory: a guest that rewrites it meanwhile only skews its
/// own error count, which it could do anyway by sending failing requests.
fn reply_is_error(mem: &GuestMemory, header: Option<GuestAddress>) -> bool {
    // `fuse_out_header`: len (u32), error (i32), unique (u64).
    header
        .and_then(|addr| addr.checked_add(4))
        .and_then(|error| mem.read_obj::<i32>(error).ok())
        .is_some_and(|error| error != 0)
}

/// The `unique` of a request a read-only device must refuse, or `None` if
/// it may go to the file system. Undecodable requests go on too: the server
/// rejects them itself.
fn refused_when_read_only(reader: &Reader<'_, ()>) -> Option<u64> {
    let mut r = reader.clone();
    let header: InHeader = r.read_obj().ok()?;
    let op = header.opcode;
    let is = |o: Opcode| op == o as u32;
    let allowed = if is(Opcode::Open) {
        // Opening for writing, or truncating, changes the file (or would).
        match r.read_obj::<OpenIn>() {
            Ok(open) => {
                let flags = open.flags as i32;
                flags & libc::O_ACCMODE == libc::O_RDONLY && flags & libc::O_TRUNC == 0
            }
            Err(_) => true,
        }
    } else if is(Opcode::Access) {
        // access(W_OK) must say what a write would get.
        match r.read_obj::<AccessIn>() {
            Ok(access) => access.mask & libc::W_OK as u32 == 0,
            Err(_) => true,
        }
    } else {
        [
            Opcode::Lookup,
            Opcode::Forget,
            Opcode::BatchForget,
            Opcode::Getattr,
            Opcode::Readlink,
            Opcode::Read,
            Opcode::Statfs,
            Opcode::Release,
            Opcode::Fsync,
            Opcode::Getxattr,
            Opcode::Listxattr,
            Opcode::Flush,
            Opcode::Init,
            Opcode::Destroy,
            Opcode::Opendir,
            Opcode::Readdir,
            Opcode::Readdirplus,
            Opcode::Releasedir,
            Opcode::Fsyncdir,
            Opcode::Getlk,
            Opcode::Setlk,
            Opcode::Setlkw,
            Opcode::Interrupt,
            Opcode::Lseek,
            Opcode::Poll,
        ]
        .into_iter()
        .any(is)
    };
    (!allowed).then_some(header.unique)
}

//! The virtio-vsock packet header (virtio 1.2 §5.10.6): 44 bytes, little-endian.
//!
//! ```text
//! le64 src_cid | le64 dst_cid | le32 src_port | le32 dst_port | le32 len
//! le16 type    | le16 op      | le32 flags    | le32 buf_alloc | le32 fwd_cnt
//! ```
//!
//! [`Header::parse`] takes whatever bytes a guest wrote and either returns a header
//! whose operation is known and whose fields are consistent with it, or a
//! [`PacketError`]; it never panics. The socket type is kept as read: only
//! [`TYPE_STREAM`] is served, and the muxer answers any other type with RST.
#![forbid(unsafe_code)]

/// Size of the header on the wire.
pub const HEADER_LEN: usize = 44;

/// The host's CID (the VMM side of every connection).
pub const HOST_CID: u64 = 2;

/// The stream socket type, the only one served.
pub const TYPE_STREAM: u16 = 1;

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both SHUTDOWN flags.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// The largest RW payload accepted or sent (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PAYLOAD: u32 = 64 * 1024;

/// A packet's operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Request,
    Response,
    Rst,
    Shutdown,
    Rw,
    CreditUpdate,
    CreditRequest,
}

impl Op {
    /// The wire value.
    pub fn to_u16(self) -> u16 {
        match self {
            Op::Request => 1,
            Op::Response => 2,
            Op::Rst => 3,
            Op::Shutdown => 4,
            Op::Rw => 5,
            Op::CreditUpdate => 6,
            Op::CreditRequest => 7,
        }
    }

    /// The operation for a wire value; `None` for 0 (INVALID) and unknown values.
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// Why a header was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("vsock header is {got} bytes, expected at least {HEADER_LEN}")]
    Short { got: usize },
    #[error("vsock header has unknown op {op}")]
    UnknownOp { op: u16 },
    #[error("vsock RW packet announces {len} payload bytes, at most {MAX_PAYLOAD} accepted")]
    PayloadTooLong { len: u32 },
    #[error("vsock {op:?} packet announces {len} payload bytes, only RW carries data")]
    PayloadOnControl { op: Op, len: u32 },
    #[error("vsock SHUTDOWN packet has flags {flags:#x}, only RCV (1) and SEND (2) exist")]
    BadShutdownFlags { flags: u32 },
}

/// A parsed, validated virtio-vsock header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    /// Payload bytes following the header (0 unless `op` is [`Op::Rw`]).
    pub len: u32,
    /// Socket type as read ([`TYPE_STREAM`] is the only one served).
    pub ty: u16,
    pub op: Op,
    pub flags: u32,
    /// The sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from this connection so far (wrapping).
    pub fwd_cnt: u32,
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl Header {
    /// Parses the first [`HEADER_LEN`] bytes of `bytes` (any bytes after them are the
    /// payload and are not looked at).
    pub fn parse(bytes: &[u8]) -> Result<Self, PacketError> {
        let b = bytes
            .get(..HEADER_LEN)
            .ok_or(PacketError::Short { got: bytes.len() })?;
        let raw_op = le_u16(b, 30);
        let op = Op::from_u16(raw_op).ok_or(PacketError::UnknownOp { op: raw_op })?;
        let h = Header {
            src_cid: le_u64(b, 0),
            dst_cid: le_u64(b, 8),
            src_port: le_u32(b, 16),
            dst_port: le_u32(b, 20),
            len: le_u32(b, 24),
            ty: le_u16(b, 28),
            op,
            flags: le_u32(b, 32),
            buf_alloc: le_u32(b, 36),
            fwd_cnt: le_u32(b, 40),
        };
        match op {
            Op::Rw if h.len > MAX_PAYLOAD => Err(PacketError::PayloadTooLong { len: h.len }),
            Op::Rw => Ok(h),
            _ if h.len != 0 => Err(PacketError::PayloadOnControl { op, len: h.len }),
            Op::Shutdown if h.flags & !SHUTDOWN_BOTH != 0 => {
                Err(PacketError::BadShutdownFlags { flags: h.flags })
            }
            _ => Ok(h),
        }
    }

    /// The header's wire form.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.ty.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_u16().to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// An RST answering `to` (a packet the guest sent): addresses swapped, the
    /// type kept so the guest can match it to its socket, no credit information.
    pub fn rst_reply(to: &Header) -> Self {
        Header {
            src_cid: to.dst_cid,
            dst_cid: to.src_cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            len: 0,
            ty: to.ty,
            op: Op::Rst,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 0x1122_3344,
            dst_port: 5000,
            len: 100,
            ty: TYPE_STREAM,
            op: Op::Rw,
            flags: 0,
            buf_alloc: 256 * 1024,
            fwd_cnt: 0xfedc_ba98,
        }
    }

    #[test]
    fn encode_then_parse_round_trips_every_field() {
        let h = sample();
        let b = h.to_bytes();
        assert_eq!(b.len(), 44);
        assert_eq!(Header::parse(&b), Ok(h));
    }

    #[test]
    fn wire_layout_is_little_endian_at_the_spec_offsets() {
        let b = sample().to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[8..16], &2u64.to_le_bytes());
        assert_eq!(&b[16..20], &[0x44, 0x33, 0x22, 0x11]);
        assert_eq!(&b[24..28], &100u32.to_le_bytes());
        assert_eq!(&b[28..30], &[1, 0]);
        assert_eq!(&b[30..32], &[5, 0]);
        assert_eq!(&b[40..44], &[0x98, 0xba, 0xdc, 0xfe]);
    }

    #[test]
    fn every_op_round_trips_and_unknown_ops_are_none() {
        for v in 1..=7u16 {
            let op = Op::from_u16(v).expect("known op");
            assert_eq!(op.to_u16(), v);
        }
        assert_eq!(Op::from_u16(0), None);
        assert_eq!(Op::from_u16(8), None);
        assert_eq!(Op::from_u16(u16::MAX), None);
    }

    #[test]
    fn short_header_is_an_error_not_a_panic() {
        let b = sample().to_bytes();
        for n in 0..HEADER_LEN {
            assert_eq!(Header::parse(&b[..n]), Err(PacketError::Short { got: n }));
        }
    }

    #[test]
    fn trailing_payload_bytes_are_ignored_by_parse() {
        let mut v = sample().to_bytes().to_vec();
        v.extend_from_slice(&[0xaa; 100]);
        assert_eq!(Header::parse(&v), Ok(sample()));
    }

    #[test]
    fn invalid_and_unknown_ops_are_rejected() {
        for op in [0u16, 8, 0x100, u16::MAX] {
            let mut b = sample().to_bytes();
            b[30..32].copy_from_slice(&op.to_le_bytes());
            assert_eq!(Header::parse(&b), Err(PacketError::UnknownOp { op }));
        }
    }

    #[test]
    fn rw_longer_than_max_payload_is_rejected() {
        let mut h = sample();
        h.len = MAX_PAYLOAD;
        assert!(Header::parse(&h.to_bytes()).is_ok());
        h.len = MAX_PAYLOAD + 1;
        assert_eq!(
            Header::parse(&h.to_bytes()),
            Err(PacketError::PayloadTooLong {
                len: MAX_PAYLOAD + 1
            })
        );
        h.len = u32::MAX;
        assert!(Header::parse(&h.to_bytes()).is_err());
    }

    #[test]
    fn zero_length_rw_parses() {
        let mut h = sample();
        h.len = 0;
        assert_eq!(Header::parse(&h.to_bytes()), Ok(h));
    }

    #[test]
    fn control_packet_with_payload_is_rejected() {
        for op in [
            Op::Request,
            Op::Response,
            Op::Rst,
            Op::Shutdown,
            Op::CreditUpdate,
            Op::CreditRequest,
        ] {
            let mut h = sample();
            h.op = op;
            h.len = 1;
            assert_eq!(
                Header::parse(&h.to_bytes()),
                Err(PacketError::PayloadOnControl { op, len: 1 })
            );
            h.len = 0;
            assert_eq!(Header::parse(&h.to_bytes()), Ok(h));
        }
    }

    #[test]
    fn shutdown_with_unknown_flag_bits_is_rejected() {
        let mut h = sample();
        h.op = Op::Shutdown;
        h.len = 0;
        for flags in [0, SHUTDOWN_RCV, SHUTDOWN_SEND, SHUTDOWN_BOTH] {
            h.flags = flags;
            assert_eq!(Header::parse(&h.to_bytes()), Ok(h));
        }
        for flags in [4, 0x8000_0000, u32::MAX] {
            h.flags = flags;
            assert_eq!(
                Header::parse(&h.to_bytes()),
                Err(PacketError::BadShutdownFlags { flags })
            );
        }
    }

    #[test]
    fn non_stream_type_parses_so_the_muxer_can_answer_rst() {
        let mut h = sample();
        h.ty = 2; // SEQPACKET
        assert_eq!(Header::parse(&h.to_bytes()).map(|h| h.ty), Ok(2));
    }

    #[test]
    fn rst_reply_swaps_addresses_and_keeps_the_type() {
        let mut h = sample();
        h.ty = 2;
        let r = Header::rst_reply(&h);
        assert_eq!((r.src_cid, r.dst_cid), (HOST_CID, 3));
        assert_eq!((r.src_port, r.dst_port), (5000, 0x1122_3344));
        assert_eq!((r.op, r.ty, r.len), (Op::Rst, 2, 0));
    }

    #[test]
    fn parse_never_panics_on_arbitrary_bytes() {
        // A cheap deterministic sweep (xorshift) over random 44-byte headers.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let mut b = [0u8; HEADER_LEN];
            for chunk in b.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let bytes = x.to_le_bytes();
                chunk.copy_from_slice(&bytes[..chunk.len()]);
            }
            if let Ok(h) = Header::parse(&b) {
                assert_eq!(h.to_bytes(), b);
            }
        }
    }
}

//! Binary frames: stream data of a channel, with a fixed 13-byte header.
//!
//! ```text
//! 0       4      5               13
//! +-------+------+---------------+-------------...
//! |channel|stream|    offset     | payload
//! | u32 BE|  u8  |    u64 BE     |
//! +-------+------+---------------+-------------...
//! ```

use bytes::{BufMut, Bytes, BytesMut};

/// Size of the binary frame header.
pub const FRAME_HEADER_LEN: usize = 13;

/// Which stream of a channel a frame belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// Input to the process (server to agent).
    Stdin,
    /// Standard output (agent to server).
    Stdout,
    /// Standard error (agent to server).
    Stderr,
    /// Opaque data: tar archives and other byte streams.
    Data,
    /// A gap marker (agent to server, exec output): the payload is a u64
    /// (big-endian) count of output bytes the agent had to drop here because
    /// its spool was full while the server was unreachable.
    Gap,
}

impl StreamKind {
    pub fn to_u8(self) -> u8 {
        match self {
            StreamKind::Stdin => 0,
            StreamKind::Stdout => 1,
            StreamKind::Stderr => 2,
            StreamKind::Data => 3,
            StreamKind::Gap => 4,
        }
    }

    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0 => StreamKind::Stdin,
            1 => StreamKind::Stdout,
            2 => StreamKind::Stderr,
            3 => StreamKind::Data,
            4 => StreamKind::Gap,
            _ => return None,
        })
    }
}

/// One binary frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Channel the data belongs to.
    pub channel: u32,
    /// Stream within the channel.
    pub stream: StreamKind,
    /// Position of the first payload byte in the channel's byte sequence
    /// for this direction (all streams of one direction share one sequence).
    pub offset: u64,
    pub payload: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("binary frame of {0} bytes is shorter than the {FRAME_HEADER_LEN}-byte header")]
    Short(usize),
    #[error("unknown stream kind {0}")]
    UnknownStream(u8),
    #[error("frame payload of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
}

impl Frame {
    pub fn encode(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(FRAME_HEADER_LEN + self.payload.len());
        buf.put_u32(self.channel);
        buf.put_u8(self.stream.to_u8());
        buf.put_u64(self.offset);
        buf.extend_from_slice(&self.payload);
        buf.freeze()
    }

    /// Decodes a binary message. `max_payload` bounds the payload size.
    pub fn decode(mut data: Bytes, max_payload: usize) -> Result<Frame, FrameError> {
        if data.len() < FRAME_HEADER_LEN {
            return Err(FrameError::Short(data.len()));
        }
        let payload = data.split_off(FRAME_HEADER_LEN);
        if payload.len() > max_payload {
            return Err(FrameError::TooLarge {
                len: payload.len(),
                max: max_payload,
            });
        }
        let h = &data[..];
        let channel = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        let stream = StreamKind::from_u8(h[4]).ok_or(FrameError::UnknownStream(h[4]))?;
        let mut off = [0u8; 8];
        off.copy_from_slice(&h[5..13]);
        Ok(Frame {
            channel,
            stream,
            offset: u64::from_be_bytes(off),
            payload,
        })
    }

    /// Channel id of an encoded frame, if its header is complete (used to
    /// address an error about a frame that failed to decode).
    pub fn peek_channel(data: &[u8]) -> Option<u32> {
        (data.len() >= 4).then(|| u32::from_be_bytes([data[0], data[1], data[2], data[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let f = Frame {
            channel: 7,
            stream: StreamKind::Stderr,
            offset: 1 << 40,
            payload: Bytes::from_static(b"hello"),
        };
        let enc = f.encode();
        assert_eq!(enc.len(), FRAME_HEADER_LEN + 5);
        assert_eq!(&enc[..5], &[0, 0, 0, 7, 2]);
        assert_eq!(Frame::decode(enc, 1024).unwrap(), f);
    }

    #[test]
    fn rejects_short_unknown_and_large() {
        assert_eq!(
            Frame::decode(Bytes::from_static(&[0; 12]), 10),
            Err(FrameError::Short(12))
        );
        let mut raw = vec![0u8; 13];
        raw[4] = 9;
        assert_eq!(
            Frame::decode(Bytes::from(raw), 10),
            Err(FrameError::UnknownStream(9))
        );
        let raw = vec![0u8; 13 + 11];
        assert!(matches!(
            Frame::decode(Bytes::from(raw), 10),
            Err(FrameError::TooLarge { len: 11, max: 10 })
        ));
    }

    proptest! {
        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Frame::decode(Bytes::from(data), 32);
        }

        #[test]
        fn encode_decode_identity(channel: u32, kind in 0u8..5, offset: u64,
                                  payload in proptest::collection::vec(any::<u8>(), 0..256)) {
            let f = Frame { channel, stream: StreamKind::from_u8(kind).unwrap(), offset, payload: Bytes::from(payload) };
            prop_assert_eq!(Frame::decode(f.encode(), 256).unwrap(), f);
        }
    }
}

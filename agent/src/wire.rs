//! The ReadFiles and Delta byte streams: length-delimited frames gathered into segments of about
//! 1 MiB, each sent as one gRPC message and, when asked, as one zstd frame. One zstd stream across
//! the whole RPC kept zstd on its slow path for input beyond a wrapped window buffer (30% of the
//! agent's CPU on a 2 GB pull); a segment compressed alone keeps the context of the many small
//! files it holds. A compressed segment is exactly one zstd frame that declares its content
//! size (as the bulk compressor writes it): the collector refuses any other, so that what it
//! decompresses is bounded before it starts.

use prost::Message;

/// Plain bytes gathered before a segment is sent.
const SEGMENT: usize = 1 << 20;

/// Field numbers of `FileFrame` (proto/…/agent.proto) that [`FrameWriter::push_file_data`] writes.
const FILE_FRAME_INDEX: u32 = 1;
const FILE_FRAME_DATA: u32 = 2;

pub struct FrameWriter {
    pending: Vec<u8>,
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

impl FrameWriter {
    pub fn new(compress: bool) -> std::io::Result<FrameWriter> {
        // Level 1: on the wire speed matters more than the last few percent (level 3 halved the
        // pull of a 2 GB tree on 2 cores; see tests/bench).
        let zstd = if compress { Some(zstd::bulk::Compressor::new(1)?) } else { None };
        Ok(FrameWriter { pending: Vec::new(), zstd })
    }

    /// Add a frame; returns a segment to send when one is due.
    pub fn push(&mut self, frame: &impl Message) -> std::io::Result<Option<Vec<u8>>> {
        self.write(&[&frame.encode_length_delimited_to_vec()])
    }

    /// Add `FileFrame { index, data }`, encoded here rather than by prost, which would first
    /// copy `data` into a message and then into its encoding: two copies of every byte read.
    pub fn push_file_data(&mut self, index: u32, data: &[u8]) -> std::io::Result<Option<Vec<u8>>> {
        use prost::encoding::{WireType, encode_key, encode_varint};
        let mut fields = Vec::with_capacity(16);
        if index != 0 {
            encode_key(FILE_FRAME_INDEX, WireType::Varint, &mut fields);
            encode_varint(index as u64, &mut fields);
        }
        encode_key(FILE_FRAME_DATA, WireType::LengthDelimited, &mut fields);
        encode_varint(data.len() as u64, &mut fields);
        let mut head = Vec::with_capacity(24);
        encode_varint((fields.len() + data.len()) as u64, &mut head);
        head.extend_from_slice(&fields);
        self.write(&[&head, data])
    }

    fn write(&mut self, parts: &[&[u8]]) -> std::io::Result<Option<Vec<u8>>> {
        for p in parts {
            self.pending.extend_from_slice(p);
        }
        if self.pending.len() < SEGMENT {
            return Ok(None);
        }
        self.segment().map(Some)
    }

    /// The pending bytes as a segment, compressed if asked.
    fn segment(&mut self) -> std::io::Result<Vec<u8>> {
        match &mut self.zstd {
            Some(z) if !self.pending.is_empty() => {
                let seg = z.compress(&self.pending)?;
                self.pending.clear();
                Ok(seg)
            }
            _ => Ok(std::mem::take(&mut self.pending)),
        }
    }

    /// The last segment (empty when nothing is pending).
    pub fn finish(mut self) -> std::io::Result<Vec<u8>> {
        self.segment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use magpie_proto::v1::FileFrame;

    /// The hand encoding decodes to the message prost would have written, and for content (never
    /// empty when sent) is byte for byte prost's own encoding.
    #[test]
    fn file_data_frames_match_prost() {
        for (index, len) in [(0u32, 1usize), (1, 5), (300, 200), (u32::MAX, 70_000), (7, 0)] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let mut w = FrameWriter::new(false).unwrap();
            w.push_file_data(index, &data).unwrap();
            let bytes = w.finish().unwrap();
            let expected = FileFrame { index, data: data.clone().into(), ..Default::default() };
            assert_eq!(FileFrame::decode_length_delimited(bytes.as_slice()).unwrap(), expected);
            if len > 0 {
                assert_eq!(bytes, expected.encode_length_delimited_to_vec());
            }
        }
    }

    /// Compressed segments, each its own zstd frame, read as one stream give the plain stream.
    #[test]
    fn compressed_segments_concatenate_to_the_plain_stream() {
        let (mut plain, mut zstd) = (FrameWriter::new(false).unwrap(), FrameWriter::new(true).unwrap());
        let (mut expected, mut segments) = (Vec::new(), Vec::new());
        for i in 0..40u32 {
            let data: Vec<u8> = (0..100_000u32).map(|j| ((i * 7 + j / 13) % 256) as u8).collect();
            expected.extend(plain.push_file_data(i, &data).unwrap().unwrap_or_default());
            segments.extend(zstd.push_file_data(i, &data).unwrap());
        }
        expected.extend(plain.finish().unwrap());
        segments.push(zstd.finish().unwrap());
        assert!(segments.len() >= 3, "{} segments", segments.len());
        assert_eq!(zstd::stream::decode_all(segments.concat().as_slice()).unwrap(), expected);
    }
}

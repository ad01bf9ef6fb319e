//! The jsonrpsee client transport over one line-framed byte stream.
//!
//! Responses are handed to jsonrpsee as raw bytes (it parses them itself), so
//! a multi-megabyte `fs.read` answer is not UTF-8-checked or copied here.

use std::io;

use futures_util::StreamExt;
use jsonrpsee::core::client::{ReceivedMessage, TransportReceiverT, TransportSenderT};
use tokio::io::AsyncWriteExt;
use tokio_util::codec::FramedRead;

use super::connect::{BoxRead, BoxWrite};
use crate::transport::{Frame, LineDecoder};

/// Longest response line accepted: a 16 MiB read is about 22.4 MiB of base64.
pub const MAX_RESPONSE_LINE: usize = 64 << 20;

pub struct LineSender {
    writer: BoxWrite,
}

pub struct LineReceiver {
    frames: FramedRead<BoxRead, LineDecoder>,
}

pub fn transport(reader: BoxRead, writer: BoxWrite) -> (LineSender, LineReceiver) {
    let frames = FramedRead::with_capacity(reader, LineDecoder::new(MAX_RESPONSE_LINE), 1 << 20);
    (LineSender { writer }, LineReceiver { frames })
}

impl TransportSenderT for LineSender {
    type Error = io::Error;

    async fn send(&mut self, msg: String) -> io::Result<()> {
        let mut line = msg.into_bytes();
        line.push(b'\n');
        self.writer.write_all(&line).await?;
        self.writer.flush().await
    }

    async fn close(&mut self) -> io::Result<()> {
        self.writer.shutdown().await
    }
}

impl TransportReceiverT for LineReceiver {
    type Error = io::Error;

    async fn receive(&mut self) -> io::Result<ReceivedMessage> {
        match self.frames.next().await {
            Some(Ok(Frame::Line(line))) => Ok(ReceivedMessage::Bytes(line.to_vec())),
            Some(Ok(Frame::TooLong)) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("response line longer than {MAX_RESPONSE_LINE} bytes"),
            )),
            Some(Err(e)) => Err(e),
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the agent closed the connection",
            )),
        }
    }
}

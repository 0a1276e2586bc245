//! The relay connection: a browser WebSocket carrying postcard frames, turned into an async
//! receive queue (the socket's callbacks push, the participant's loop pulls).

use futures_channel::mpsc;
use futures_util::StreamExt;
use tessera_protocol::{ClientMsg, MAX_CONTROL_BYTES, ServerMsg, decode, encode};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use web_sys::{BinaryType, CloseEvent, MessageEvent, WebSocket};

use crate::platform::describe;

enum Incoming {
    Open,
    Frame(Vec<u8>),
    Closed(String),
}

/// An open connection to the relay.
pub struct Socket {
    ws: WebSocket,
    rx: mpsc::UnboundedReceiver<Incoming>,
    _callbacks: Vec<Closure<dyn FnMut(JsValue)>>,
}

impl Socket {
    /// Opens `url` and waits until the connection is established.
    pub async fn connect(url: &str) -> Result<Socket, String> {
        let ws = WebSocket::new(url).map_err(|e| format!("{url}: {}", describe(e)))?;
        ws.set_binary_type(BinaryType::Arraybuffer);
        let (tx, rx) = mpsc::unbounded();
        let on = |tx: mpsc::UnboundedSender<Incoming>, f: fn(JsValue) -> Incoming| {
            Closure::<dyn FnMut(JsValue)>::new(move |e: JsValue| {
                let _ = tx.unbounded_send(f(e));
            })
        };
        let open = on(tx.clone(), |_| Incoming::Open);
        let message = on(tx.clone(), |e| {
            let data = e.unchecked_into::<MessageEvent>().data();
            match data.dyn_into::<js_sys::ArrayBuffer>() {
                Ok(buf) => Incoming::Frame(js_sys::Uint8Array::new(&buf).to_vec()),
                Err(_) => Incoming::Closed("the relay sent a text frame".into()),
            }
        });
        let close = on(tx.clone(), |e| {
            let e = e.unchecked_into::<CloseEvent>();
            Incoming::Closed(format!(
                "connection closed (code {}{}{})",
                e.code(),
                if e.reason().is_empty() { "" } else { ": " },
                e.reason()
            ))
        });
        let error = on(tx, |_| Incoming::Closed("connection failed".into()));
        ws.set_onopen(Some(open.as_ref().unchecked_ref()));
        ws.set_onmessage(Some(message.as_ref().unchecked_ref()));
        ws.set_onclose(Some(close.as_ref().unchecked_ref()));
        ws.set_onerror(Some(error.as_ref().unchecked_ref()));
        let mut socket = Socket {
            ws,
            rx,
            _callbacks: vec![open, message, close, error],
        };
        match socket.rx.next().await {
            Some(Incoming::Open) => Ok(socket),
            Some(Incoming::Closed(why)) => Err(format!("{url}: {why}")),
            _ => Err(format!("{url}: connection failed")),
        }
    }

    /// Sends one message. The bytes are copied into a JavaScript buffer first: the threaded
    /// bundle's memory is a SharedArrayBuffer, which `WebSocket.send` refuses to read from.
    pub fn send(&self, msg: &ClientMsg) -> Result<(), String> {
        let frame = js_sys::Uint8Array::from(encode(msg).as_slice());
        self.ws
            .send_with_array_buffer(&frame.buffer())
            .map_err(|e| format!("sending to the relay: {}", describe(e)))
    }

    fn parse(incoming: Incoming) -> Result<Option<ServerMsg>, String> {
        match incoming {
            Incoming::Open => Ok(None),
            Incoming::Closed(why) => Err(why),
            Incoming::Frame(bytes) => {
                let msg: ServerMsg = decode(&bytes, MAX_CONTROL_BYTES)
                    .map_err(|e| format!("bad frame from the relay: {e}"))?;
                if let ServerMsg::Error { message } = &msg {
                    return Err(format!("relay error: {message}"));
                }
                Ok(Some(msg))
            }
        }
    }

    /// Waits for the next message.
    pub async fn recv(&mut self) -> Result<ServerMsg, String> {
        loop {
            let incoming = self
                .rx
                .next()
                .await
                .ok_or_else(|| "connection closed".to_string())?;
            if let Some(msg) = Self::parse(incoming)? {
                return Ok(msg);
            }
        }
    }

    /// The next message if one has arrived, without waiting.
    pub fn try_recv(&mut self) -> Result<Option<ServerMsg>, String> {
        loop {
            match self.rx.try_recv() {
                Ok(incoming) => {
                    if let Some(msg) = Self::parse(incoming)? {
                        return Ok(Some(msg));
                    }
                }
                Err(mpsc::TryRecvError::Closed) => return Err("connection closed".into()),
                Err(mpsc::TryRecvError::Empty) => return Ok(None),
            }
        }
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        self.ws.set_onopen(None);
        self.ws.set_onmessage(None);
        self.ws.set_onclose(None);
        self.ws.set_onerror(None);
        let _ = self.ws.close();
    }
}

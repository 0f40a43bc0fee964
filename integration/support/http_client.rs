//! A small HTTP/1.1 client for the store's HTTP tests, standing in for curl: one request per
//! connection, and streamed responses read line by line (the JSON gateway's watch).

#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::time::Duration;
use tokio::sync::mpsc;

/// A whole response.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Reply {
    /// The body as JSON (panics with the body if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

async fn send(
    endpoint: &str,
    method: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> http::Response<hyper::body::Incoming> {
    let addr = endpoint.trim_start_matches("http://").to_string();
    let tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", &addr)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a request");
    for (name, value) in headers {
        let name = http::HeaderName::from_bytes(name.as_bytes()).expect("a header name");
        let value = http::HeaderValue::from_str(value).expect("a header value");
        req.headers_mut().insert(name, value);
    }
    sender.send_request(req).await.expect("an HTTP response")
}

/// One request and its whole response.
pub async fn request(endpoint: &str, method: &str, path: &str, body: &str) -> Reply {
    request_with(endpoint, method, path, body, &[]).await
}

pub async fn request_with(
    endpoint: &str,
    method: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let call = async {
        let resp = send(endpoint, method, path, body, headers).await;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .expect("the response body")
            .to_bytes();
        Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    };
    tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .unwrap_or_else(|_| panic!("{method} {path} answered within 20s"))
}

pub async fn get(endpoint: &str, path: &str) -> Reply {
    request(endpoint, "GET", path, "").await
}

pub async fn post(endpoint: &str, path: &str, body: &str) -> Reply {
    request(endpoint, "POST", path, body).await
}

/// A POST whose response streams: its status, and its lines as they come (the channel ends
/// with the response).
pub async fn post_stream(endpoint: &str, path: &str, body: &str) -> (u16, mpsc::Receiver<String>) {
    let resp = send(endpoint, "POST", path, body, &[]).await;
    let status = resp.status().as_u16();
    let (tx, rx) = mpsc::channel(64);
    let mut body = resp.into_body();
    tokio::spawn(async move {
        let mut buf = Vec::new();
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                buf.extend_from_slice(&data);
            }
            while let Some(at) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=at).collect();
                let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                if tx.send(line).await.is_err() {
                    return;
                }
            }
        }
        if !buf.is_empty() {
            let _ = tx.send(String::from_utf8_lossy(&buf).into_owned()).await;
        }
    });
    (status, rx)
}

/// The next line of a stream, as JSON.
pub async fn next_json(lines: &mut mpsc::Receiver<String>) -> serde_json::Value {
    let line = tokio::time::timeout(Duration::from_secs(20), lines.recv())
        .await
        .expect("a line within 20s")
        .expect("the stream goes on");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
}

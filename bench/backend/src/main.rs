//! `bench-backend`: the upstream every benchmark contender proxies to.
//!
//! Listens on one or more loopback ports and answers every request with a fixed body, speaking
//! HTTP/1.1 and HTTP/2 with prior knowledge on the same port. Request bodies are read and
//! discarded (so upload scenarios measure the proxy, not the backend). A request with
//! `content-type: application/grpc` gets a gRPC-shaped answer: one length-prefixed message and
//! `grpc-status: 0` in trailers. It is deliberately minimal so that it is never the bottleneck.
use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Parser;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(about = "Fast HTTP/1.1 + h2c benchmark backend")]
struct Args {
    /// Addresses to listen on (repeatable), e.g. 127.0.0.1:9101.
    #[arg(long = "listen", required = true)]
    listen: Vec<SocketAddr>,
    /// Size of every response body in bytes.
    #[arg(long, default_value_t = 64)]
    body_bytes: usize,
    /// Answer an XML document (`application/xml`) of about `body_bytes` instead of `x…x`.
    #[arg(long)]
    xml: bool,
    /// Worker threads of the runtime.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .context("building the runtime")?;
    rt.block_on(serve(args))
}

async fn serve(args: Args) -> Result<()> {
    let body = if args.xml {
        Bytes::from(xml_document(args.body_bytes))
    } else {
        Bytes::from(vec![b'x'; args.body_bytes])
    };
    // Plain answers keep carrying no type, as every scenario's baseline always has.
    let content_type = args
        .xml
        .then(|| HeaderValue::from_static("application/xml"));
    let mut grpc = Vec::with_capacity(5 + args.body_bytes);
    grpc.push(0);
    grpc.extend_from_slice(&u32::try_from(args.body_bytes)?.to_be_bytes());
    grpc.extend_from_slice(&body);
    let grpc = Bytes::from(grpc);
    let mut tasks = Vec::new();
    for addr in &args.listen {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        eprintln!("bench-backend: listening on {addr}");
        let (body, grpc) = (body.clone(), grpc.clone());
        tasks.push(tokio::spawn(accept_loop(
            listener,
            body,
            grpc,
            content_type.clone(),
        )));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    body: Bytes,
    grpc: Bytes,
    content_type: Option<HeaderValue>,
) -> Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let (body, grpc, ct) = (body.clone(), grpc.clone(), content_type.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| respond(req, body.clone(), grpc.clone(), ct.clone()));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn respond(
    req: Request<Incoming>,
    body: Bytes,
    grpc: Bytes,
    content_type: Option<HeaderValue>,
) -> Result<Response<Body>, Infallible> {
    let is_grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    // Drain the request body so uploads are fully transferred before we answer.
    let mut incoming = req.into_body();
    while let Some(frame) = incoming.frame().await {
        if frame.is_err() {
            break;
        }
    }
    if is_grpc {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let mut resp = Response::new(BodyExt::boxed(GrpcBody {
            message: Some(grpc),
            trailers: Some(trailers),
        }));
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        return Ok(resp);
    }
    let mut resp = Response::new(BodyExt::boxed(Full::new(body)));
    if let Some(ct) = content_type {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, ct);
    }
    Ok(resp)
}

/// A catalog of items, about `bytes` long: attributes, repeated elements, text.
fn xml_document(bytes: usize) -> String {
    let mut doc = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?><catalog>");
    let mut i = 0;
    while doc.len() + 100 < bytes {
        doc.push_str(&format!(
            "<item id=\"{i}\"><name>item {i}</name><price cur=\"EUR\">9.99</price><tag>a</tag><tag>b</tag></item>"
        ));
        i += 1;
    }
    doc.push_str("</catalog>");
    doc
}

/// One gRPC message followed by trailers.
struct GrpcBody {
    message: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl hyper::body::Body for GrpcBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let frame = match self.message.take() {
            Some(m) => Some(Frame::data(m)),
            None => self.trailers.take().map(Frame::trailers),
        };
        std::task::Poll::Ready(frame.map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.message.is_none() && self.trailers.is_none()
    }
}

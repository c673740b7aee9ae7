//! L7 data path: HTTP/1.1 and HTTP/2 listeners, routing, proxying.

/// `Box::pin($future)`, with the room allocated before the future is made, so the future is
/// written straight into it. `Box::pin` makes it on the stack and copies it into the box: the
/// futures boxed on the request path are kilobytes (the HTTP/1.1 exchange's 6 KiB copy was
/// ~600 of ~25k instructions per keep-alive request, callgrind).
macro_rules! box_in_place {
    ($future:expr) => {
        ::std::boxed::Box::into_pin(::std::boxed::Box::write(
            ::std::boxed::Box::new_uninit(),
            $future,
        ))
    };
}
pub(crate) use box_in_place;

pub mod answer;
pub mod body;
pub mod cluster;
pub mod conn;
pub mod downstream;
pub mod filter;
pub mod grpc;
pub mod h1;
pub mod h2;
pub mod headers;
pub mod io;
pub mod log;
pub mod proxy;
pub mod reason;
pub mod router;
pub mod runtime;
pub mod server;
pub mod tcp;
pub mod timer;
pub mod tls;
pub mod trace;
pub mod workers;

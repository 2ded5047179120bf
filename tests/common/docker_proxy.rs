//! A TCP proxy in front of the Docker socket that a test can cut and
//! restore, to break portless's event stream the way a daemon restart or a
//! dropped connection would.

use std::io::ErrorKind;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct State {
    up: AtomicBool,
    stop: AtomicBool,
    tcp: Mutex<Vec<TcpStream>>,
    unix: Mutex<Vec<UnixStream>>,
}

pub struct DockerProxy {
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl DockerProxy {
    pub fn start() -> DockerProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        state.up.store(true, Ordering::SeqCst);
        let st = state.clone();
        std::thread::spawn(move || {
            while !st.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((tcp, _)) => {
                        if !st.up.load(Ordering::SeqCst) {
                            let _ = tcp.shutdown(Shutdown::Both);
                            continue;
                        }
                        let _ = tcp.set_nonblocking(false);
                        let Ok(unix) = UnixStream::connect("/var/run/docker.sock") else {
                            let _ = tcp.shutdown(Shutdown::Both);
                            continue;
                        };
                        st.tcp.lock().unwrap().push(tcp.try_clone().unwrap());
                        st.unix.lock().unwrap().push(unix.try_clone().unwrap());
                        let (mut t1, mut u1) =
                            (tcp.try_clone().unwrap(), unix.try_clone().unwrap());
                        let (mut t2, mut u2) = (tcp, unix);
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut t1, &mut u1);
                            let _ = u1.shutdown(Shutdown::Write);
                        });
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut u2, &mut t2);
                            let _ = t2.shutdown(Shutdown::Both);
                        });
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        DockerProxy { addr, state }
    }

    /// Drop every connection and refuse new ones until `restore`.
    pub fn cut(&self) {
        self.state.up.store(false, Ordering::SeqCst);
        for s in self.state.tcp.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        for s in self.state.unix.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.state.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for DockerProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        self.cut();
    }
}

"""Names and lifetimes of a run on the machine: run ids, runtime directory, endpoints (`paths`),
supervisor liveness (`liveness`) and removal of what dead runs left behind (`cleanup`)."""

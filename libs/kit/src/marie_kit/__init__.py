"""Marie's service kit: what every gRPC service and client of the suite shares."""

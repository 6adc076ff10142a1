//! Which role may call which route. Admins call everything; services (other orderwave
//! processes) everything but the operator endpoints and the reports; customers only the routes listed here,
//! where the service then shows them their own records only. A route missing from the list is
//! closed to customers: a new route is never open to them by accident.

use axum::http::Method;
use http_kit::Role;

/// (method, route) pairs a customer may call.
pub const CUSTOMER_ROUTES: &[(&str, &str)] = &[
    ("POST", "/api/v1/orders"),
    ("GET", "/api/v1/orders"),
    ("GET", "/api/v1/orders/{id}"),
    ("PUT", "/api/v1/orders/{id}"),
    ("DELETE", "/api/v1/orders/{id}"),
    ("GET", "/api/v1/orders/{id}/history"),
    ("GET", "/api/v1/orders/{id}/events"),
    ("GET", "/api/v1/orders/ws"),
    ("GET", "/api/v1/orders/events"),
    ("GET", "/api/v1/customers/{customerId}/orders"),
    ("GET", "/api/v1/customers/{id}"),
    ("PUT", "/api/v1/customers/{id}"),
    ("GET", "/api/v1/products"),
    ("GET", "/api/v1/inventory/{sku}"),
    ("GET", "/api/v1/payments"),
    ("GET", "/api/v1/payments/{id}"),
    ("GET", "/api/v1/notifications"),
    ("GET", "/api/v1/notifications/{id}"),
];

/// The operator endpoints: admins only.
pub const ADMIN_PREFIX: &str = "/api/v1/admin/";
/// Reports over every customer's orders: admins only.
pub const REPORTS_PREFIX: &str = "/api/v1/reports/";

pub fn allows(role: Role, method: &Method, route: &str) -> bool {
    match role {
        Role::Admin => true,
        Role::Service => !route.starts_with(ADMIN_PREFIX) && !route.starts_with(REPORTS_PREFIX),
        Role::Customer => CUSTOMER_ROUTES
            .iter()
            .any(|(m, r)| *m == method.as_str() && *r == route),
    }
}

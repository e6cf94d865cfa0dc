"""Authentication for the gateway: the shared JWT code of :mod:`c2lcore._jwt`."""

from c2lcore._jwt import ADMIN_PERMISSION as ADMIN_PERMISSION
from c2lcore._jwt import ALGORITHMS as ALGORITHMS
from c2lcore._jwt import DEV_AUDIENCE as DEV_AUDIENCE
from c2lcore._jwt import DEV_ISSUER as DEV_ISSUER
from c2lcore._jwt import LEEWAY_S as LEEWAY_S
from c2lcore._jwt import MAX_TOKEN_BYTES as MAX_TOKEN_BYTES
from c2lcore._jwt import AuthCode as AuthCode
from c2lcore._jwt import Authenticator as Authenticator
from c2lcore._jwt import AuthError as AuthError
from c2lcore._jwt import DevIssuer as DevIssuer
from c2lcore._jwt import JwksAuthenticator as JwksAuthenticator
from c2lcore._jwt import Principal as Principal
from c2lcore._jwt import bearer_token as bearer_token
from c2lcore._jwt import decode_token as decode_token
from c2lcore._jwt import make_authenticator as make_authenticator

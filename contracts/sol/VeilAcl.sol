// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title VeilAcl: which miners may serve which private Veil sessions.
/// @notice Admins run the miner registry; session owners (or admins) decide which registered,
/// active miners may serve each of their sessions. Routers follow this contract's events and
/// enforce it (protocol section 7.5). Every refusal is a custom error and every change emits an
/// event, so the full history can be audited and replayed from the logs.
/// @dev Sessions, miners and admins are also kept in enumerable lists so that a reader can take
/// a consistent snapshot with view calls pinned to one block, then follow the logs from there.
contract VeilAcl {
    // ------------------------------------------------------------------ types

    /// @notice A miner as registered by an admin.
    struct MinerInfo {
        /// X25519 public key that session and task keys are wrapped to.
        bytes32 x25519;
        /// Where the operator describes the miner (models, hardware, contact).
        string metadataUri;
        /// Ever registered (stays true after deactivation).
        bool registered;
        /// May be allowed for sessions and counts in `isAllowed`.
        bool active;
    }

    /// @notice A session's on-chain record.
    struct SessionInfo {
        bytes16 id;
        /// Current owner; kept after the session is closed, for the record.
        address owner;
        /// A closed session allows no miner and can never be reopened or registered again.
        bool closed;
        /// Number of miners on the session's allowlist.
        uint256 allowedCount;
    }

    struct Session {
        address owner;
        bool closed;
    }

    // ------------------------------------------------------------------ errors

    /// The caller is not an admin.
    error NotAdmin(address caller);
    /// The caller is neither the session's owner nor an admin.
    error NotSessionOwnerOrAdmin(bytes16 sessionId, address caller);
    /// The caller is not the session's owner.
    error NotSessionOwner(bytes16 sessionId, address caller);
    /// The zero address was given where an account is required.
    error ZeroAddress();
    /// The account is already an admin.
    error AlreadyAdmin(address account);
    /// The account is not an admin.
    error NotAnAdmin(address account);
    /// Removing this admin would leave the contract with no admin.
    error LastAdmin(address account);
    /// The all-zero X25519 key was given.
    error ZeroX25519Key();
    /// The miner is registered and active already.
    error MinerAlreadyActive(address miner);
    /// The address was never registered as a miner.
    error UnknownMiner(address miner);
    /// The miner is registered but deactivated.
    error MinerNotActive(address miner);
    /// The all-zero session id was given.
    error ZeroSessionId();
    /// The session id is registered already (possibly closed: ids are never reused).
    error SessionAlreadyRegistered(bytes16 sessionId);
    /// The session id is not registered.
    error UnknownSession(bytes16 sessionId);
    /// The session is closed.
    error SessionIsClosed(bytes16 sessionId);
    /// The miner is on the session's allowlist already.
    error MinerAlreadyAllowed(bytes16 sessionId, address miner);
    /// The miner is not on the session's allowlist.
    error MinerNotAllowed(bytes16 sessionId, address miner);
    /// A batch call was given no miners.
    error EmptyBatch();
    /// A page was requested with a limit of zero.
    error ZeroLimit();

    // ------------------------------------------------------------------ events

    event AdminAdded(address indexed admin, address indexed by);
    event AdminRemoved(address indexed admin, address indexed by);
    event MinerRegistered(address indexed miner, bytes32 x25519, string metadataUri, address indexed by);
    event MinerDeactivated(address indexed miner, address indexed by);
    event MinerKeyRotated(address indexed miner, bytes32 oldX25519, bytes32 newX25519);
    event SessionRegistered(bytes16 indexed sessionId, address indexed owner);
    event SessionTransferred(bytes16 indexed sessionId, address indexed from, address indexed to);
    event SessionClosed(bytes16 indexed sessionId, address indexed by);
    event MinerAllowed(bytes16 indexed sessionId, address indexed miner, address indexed by);
    event MinerRevoked(bytes16 indexed sessionId, address indexed miner, address indexed by);

    // ------------------------------------------------------------------ state

    mapping(address => uint256) private _adminIndex; // position in _admins, plus one
    address[] private _admins;

    mapping(address => MinerInfo) private _miners;
    address[] private _minerList; // every address ever registered, in registration order

    mapping(bytes16 => Session) private _sessions;
    bytes16[] private _sessionList; // every session ever registered, in registration order
    mapping(bytes16 => address[]) private _allowed;
    mapping(bytes16 => mapping(address => uint256)) private _allowedIndex; // position plus one

    // ------------------------------------------------------------------ modifiers

    modifier onlyAdmin() {
        if (_adminIndex[msg.sender] == 0) revert NotAdmin(msg.sender);
        _;
    }

    /// @param initialAdmins the first admins; the deployer when empty.
    constructor(address[] memory initialAdmins) {
        if (initialAdmins.length == 0) {
            _addAdmin(msg.sender);
        } else {
            for (uint256 i = 0; i < initialAdmins.length; i++) {
                _addAdmin(initialAdmins[i]);
            }
        }
    }

    // ------------------------------------------------------------------ admins

    /// @notice Makes `account` an admin.
    function addAdmin(address account) external onlyAdmin {
        _addAdmin(account);
    }

    /// @notice Removes `account` from the admins; an admin may remove itself, but never the last one.
    function removeAdmin(address account) external onlyAdmin {
        uint256 idx = _adminIndex[account];
        if (idx == 0) revert NotAnAdmin(account);
        if (_admins.length == 1) revert LastAdmin(account);
        address last = _admins[_admins.length - 1];
        _admins[idx - 1] = last;
        _adminIndex[last] = idx;
        _admins.pop();
        delete _adminIndex[account];
        emit AdminRemoved(account, msg.sender);
    }

    function _addAdmin(address account) private {
        if (account == address(0)) revert ZeroAddress();
        if (_adminIndex[account] != 0) revert AlreadyAdmin(account);
        _admins.push(account);
        _adminIndex[account] = _admins.length;
        emit AdminAdded(account, msg.sender);
    }

    // ------------------------------------------------------------------ miners

    /// @notice Registers `miner` (or re-registers a deactivated one) with its X25519 key and metadata URI.
    function registerMiner(address miner, bytes32 x25519, string calldata metadataUri) external onlyAdmin {
        if (miner == address(0)) revert ZeroAddress();
        if (x25519 == bytes32(0)) revert ZeroX25519Key();
        MinerInfo storage m = _miners[miner];
        if (m.active) revert MinerAlreadyActive(miner);
        if (!m.registered) {
            m.registered = true;
            _minerList.push(miner);
        }
        m.active = true;
        m.x25519 = x25519;
        m.metadataUri = metadataUri;
        emit MinerRegistered(miner, x25519, metadataUri, msg.sender);
    }

    /// @notice Deactivates `miner`: it stays on allowlists but is allowed nowhere until re-registered.
    function deactivateMiner(address miner) external onlyAdmin {
        MinerInfo storage m = _miners[miner];
        if (!m.registered) revert UnknownMiner(miner);
        if (!m.active) revert MinerNotActive(miner);
        m.active = false;
        emit MinerDeactivated(miner, msg.sender);
    }

    /// @notice A registered, active miner replaces its own X25519 key.
    function rotateMinerKey(bytes32 newX25519) external {
        MinerInfo storage m = _miners[msg.sender];
        if (!m.registered) revert UnknownMiner(msg.sender);
        if (!m.active) revert MinerNotActive(msg.sender);
        if (newX25519 == bytes32(0)) revert ZeroX25519Key();
        bytes32 old = m.x25519;
        m.x25519 = newX25519;
        emit MinerKeyRotated(msg.sender, old, newX25519);
    }

    // ------------------------------------------------------------------ sessions

    /// @notice Registers `sessionId` with the caller as its owner.
    function registerSession(bytes16 sessionId) external {
        if (sessionId == bytes16(0)) revert ZeroSessionId();
        if (_sessions[sessionId].owner != address(0)) revert SessionAlreadyRegistered(sessionId);
        _sessions[sessionId].owner = msg.sender;
        _sessionList.push(sessionId);
        emit SessionRegistered(sessionId, msg.sender);
    }

    /// @notice The owner hands the session to `newOwner`.
    function transferSession(bytes16 sessionId, address newOwner) external {
        Session storage s = _openSession(sessionId);
        if (s.owner != msg.sender) revert NotSessionOwner(sessionId, msg.sender);
        if (newOwner == address(0)) revert ZeroAddress();
        s.owner = newOwner;
        emit SessionTransferred(sessionId, msg.sender, newOwner);
    }

    /// @notice The owner closes the session for good: no miner is allowed for it any more.
    function closeSession(bytes16 sessionId) external {
        Session storage s = _openSession(sessionId);
        if (s.owner != msg.sender) revert NotSessionOwner(sessionId, msg.sender);
        s.closed = true;
        emit SessionClosed(sessionId, msg.sender);
    }

    /// @notice The owner or an admin puts a registered, active miner on the session's allowlist.
    function allowMiner(bytes16 sessionId, address miner) external {
        _checkManager(sessionId);
        _allow(sessionId, miner);
    }

    /// @notice Batch form of `allowMiner`: all or nothing.
    function allowMiners(bytes16 sessionId, address[] calldata miners) external {
        if (miners.length == 0) revert EmptyBatch();
        _checkManager(sessionId);
        for (uint256 i = 0; i < miners.length; i++) {
            _allow(sessionId, miners[i]);
        }
    }

    /// @notice The owner or an admin takes a miner off the session's allowlist.
    function revokeMiner(bytes16 sessionId, address miner) external {
        _checkManager(sessionId);
        _revoke(sessionId, miner);
    }

    /// @notice Batch form of `revokeMiner`: all or nothing.
    function revokeMiners(bytes16 sessionId, address[] calldata miners) external {
        if (miners.length == 0) revert EmptyBatch();
        _checkManager(sessionId);
        for (uint256 i = 0; i < miners.length; i++) {
            _revoke(sessionId, miners[i]);
        }
    }

    function _openSession(bytes16 sessionId) private view returns (Session storage s) {
        s = _sessions[sessionId];
        if (s.owner == address(0)) revert UnknownSession(sessionId);
        if (s.closed) revert SessionIsClosed(sessionId);
    }

    function _checkManager(bytes16 sessionId) private view {
        Session storage s = _openSession(sessionId);
        if (s.owner != msg.sender && _adminIndex[msg.sender] == 0) {
            revert NotSessionOwnerOrAdmin(sessionId, msg.sender);
        }
    }

    function _allow(bytes16 sessionId, address miner) private {
        MinerInfo storage m = _miners[miner];
        if (!m.registered) revert UnknownMiner(miner);
        if (!m.active) revert MinerNotActive(miner);
        if (_allowedIndex[sessionId][miner] != 0) revert MinerAlreadyAllowed(sessionId, miner);
        _allowed[sessionId].push(miner);
        _allowedIndex[sessionId][miner] = _allowed[sessionId].length;
        emit MinerAllowed(sessionId, miner, msg.sender);
    }

    function _revoke(bytes16 sessionId, address miner) private {
        uint256 idx = _allowedIndex[sessionId][miner];
        if (idx == 0) revert MinerNotAllowed(sessionId, miner);
        address[] storage list = _allowed[sessionId];
        address last = list[list.length - 1];
        list[idx - 1] = last;
        _allowedIndex[sessionId][last] = idx;
        list.pop();
        delete _allowedIndex[sessionId][miner];
        emit MinerRevoked(sessionId, miner, msg.sender);
    }

    // ------------------------------------------------------------------ views

    /// @notice True when the session is registered and open, the miner is on its allowlist, and
    /// the miner is active.
    function isAllowed(bytes16 sessionId, address miner) external view returns (bool) {
        Session storage s = _sessions[sessionId];
        return s.owner != address(0) && !s.closed && _allowedIndex[sessionId][miner] != 0
            && _miners[miner].active;
    }

    /// @notice The session's owner, or the zero address when it is not registered.
    function sessionOwner(bytes16 sessionId) external view returns (address) {
        return _sessions[sessionId].owner;
    }

    /// @notice The session's record; `owner` is zero when it is not registered.
    function sessionInfo(bytes16 sessionId) public view returns (SessionInfo memory) {
        Session storage s = _sessions[sessionId];
        return SessionInfo(sessionId, s.owner, s.closed, _allowed[sessionId].length);
    }

    /// @notice Number of miners on the session's allowlist.
    function allowedMinerCount(bytes16 sessionId) external view returns (uint256) {
        return _allowed[sessionId].length;
    }

    /// @notice Up to `limit` miners of the session's allowlist, from position `offset` (unordered).
    function allowedMiners(bytes16 sessionId, uint256 offset, uint256 limit)
        external
        view
        returns (address[] memory page)
    {
        page = _page(_allowed[sessionId], offset, limit);
    }

    /// @notice The miner's record; `registered` is false when it was never registered.
    function minerInfo(address account) external view returns (MinerInfo memory) {
        return _miners[account];
    }

    /// @notice True when `account` is an admin.
    function isAdmin(address account) external view returns (bool) {
        return _adminIndex[account] != 0;
    }

    /// @notice All admins (unordered; there are few).
    function admins() external view returns (address[] memory) {
        return _admins;
    }

    /// @notice Number of addresses ever registered as miners.
    function minerCount() external view returns (uint256) {
        return _minerList.length;
    }

    /// @notice Up to `limit` miner addresses, in registration order, from position `offset`.
    function minersPage(uint256 offset, uint256 limit) external view returns (address[] memory page) {
        page = _page(_minerList, offset, limit);
    }

    /// @notice Number of sessions ever registered (closed ones included).
    function sessionCount() external view returns (uint256) {
        return _sessionList.length;
    }

    /// @notice Up to `limit` session records, in registration order, from position `offset`.
    function sessionsPage(uint256 offset, uint256 limit) external view returns (SessionInfo[] memory page) {
        if (limit == 0) revert ZeroLimit();
        uint256 n = _sessionList.length;
        if (offset >= n) return new SessionInfo[](0);
        uint256 end = n - offset > limit ? offset + limit : n;
        page = new SessionInfo[](end - offset);
        for (uint256 i = offset; i < end; i++) {
            page[i - offset] = sessionInfo(_sessionList[i]);
        }
    }

    function _page(address[] storage list, uint256 offset, uint256 limit)
        private
        view
        returns (address[] memory page)
    {
        if (limit == 0) revert ZeroLimit();
        uint256 n = list.length;
        if (offset >= n) return new address[](0);
        uint256 end = n - offset > limit ? offset + limit : n;
        page = new address[](end - offset);
        for (uint256 i = offset; i < end; i++) {
            page[i - offset] = list[i];
        }
    }
}
